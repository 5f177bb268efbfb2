// This file owns the client's errors: the daemon's error replies as *Error with one code
// constant and one sentinel per wire code, and the client's own connection, close and timeout
// errors.

package sidebus

import (
	"errors"
	"fmt"
)

// Code is a wire error code. The code, not the message, is the contract.
type Code string

// The wire error codes of protocol version 1 (PROTOCOL.md, "Errors").
const (
	CodeBadFrame            Code = "bad_frame"
	CodeFrameTooLarge       Code = "frame_too_large"
	CodeBadRequest          Code = "bad_request"
	CodeUnknownOp           Code = "unknown_op"
	CodeUnsupportedProtocol Code = "unsupported_protocol"
	CodeValidationFailed    Code = "validation_failed"
	CodeUnknownVersion      Code = "unknown_version"
	CodeIncompatibleSchema  Code = "incompatible_schema"
	CodeUnknownTag          Code = "unknown_tag"
	CodeNotFound            Code = "not_found"
	CodeBackpressure        Code = "backpressure"
	CodeUnavailable         Code = "unavailable"
	CodeUnauthorized        Code = "unauthorized"
	CodeInternal            Code = "internal"
)

var knownCodes = map[Code]bool{
	CodeBadFrame: true, CodeFrameTooLarge: true, CodeBadRequest: true, CodeUnknownOp: true,
	CodeUnsupportedProtocol: true, CodeValidationFailed: true, CodeUnknownVersion: true,
	CodeIncompatibleSchema: true, CodeUnknownTag: true, CodeNotFound: true, CodeBackpressure: true,
	CodeUnavailable: true, CodeUnauthorized: true, CodeInternal: true,
}

// Error is an error reply of the daemon (or an error push). Test for a code with errors.Is and
// the sentinels below, e.g. errors.Is(err, sidebus.ErrBackpressure), or read it with errors.As.
type Error struct {
	// Code is the wire code; a code this client does not know is reported as CodeInternal
	// (the protocol says so) and the daemon's original code is kept at the front of Message.
	Code Code
	// Message is for people and may change.
	Message string
	// Details names what was wrong: {"field", "message"} for bad_request, {"path", "message"}
	// for validation_failed, {"message"} for incompatible_schema.
	Details []map[string]any
}

func (e *Error) Error() string {
	if e.Message == "" {
		return "sidebus: " + string(e.Code)
	}
	return "sidebus: " + string(e.Code) + ": " + e.Message
}

// Is makes errors.Is(err, sidebus.ErrNotFound) true for every *Error with that code, whatever
// its message: the sentinels carry only a code.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Message == "" && t.Details == nil && t.Code == e.Code
}

func newError(code, message string, details []map[string]any) *Error {
	c := Code(code)
	if !knownCodes[c] {
		if message == "" {
			message = code
		} else {
			message = code + ": " + message
		}
		c = CodeInternal
	}
	return &Error{Code: c, Message: message, Details: details}
}

// One sentinel per wire code, for errors.Is.
var (
	ErrBadFrame            = &Error{Code: CodeBadFrame}
	ErrFrameTooLarge       = &Error{Code: CodeFrameTooLarge}
	ErrBadRequest          = &Error{Code: CodeBadRequest}
	ErrUnknownOp           = &Error{Code: CodeUnknownOp}
	ErrUnsupportedProtocol = &Error{Code: CodeUnsupportedProtocol}
	ErrValidationFailed    = &Error{Code: CodeValidationFailed}
	ErrUnknownVersion      = &Error{Code: CodeUnknownVersion}
	ErrIncompatibleSchema  = &Error{Code: CodeIncompatibleSchema}
	ErrUnknownTag          = &Error{Code: CodeUnknownTag}
	ErrNotFound            = &Error{Code: CodeNotFound}
	ErrBackpressure        = &Error{Code: CodeBackpressure}
	ErrUnavailable         = &Error{Code: CodeUnavailable}
	ErrUnauthorized        = &Error{Code: CodeUnauthorized}
	ErrInternal            = &Error{Code: CodeInternal}
)

// The client's own errors.
var (
	// ErrConnectionLost: the connection broke while the request was in flight. The request
	// may or may not have taken effect; a publish is never re-sent by the client (re-send it
	// with the same EventID to be safe).
	ErrConnectionLost = errors.New("sidebus: connection lost")
	// ErrClosed: the client (or the subscription) was closed.
	ErrClosed = errors.New("sidebus: client closed")
	// ErrTimeout: the client was disconnected and did not reconnect within
	// Options.ReconnectTimeout.
	ErrTimeout = errors.New("sidebus: timed out waiting for the connection to the daemon")
	// ErrProtocol: the daemon sent something this client does not understand.
	ErrProtocol = errors.New("sidebus: protocol error")
	// ErrAlreadySettled: the delivery was already acked or nacked.
	ErrAlreadySettled = errors.New("sidebus: delivery already acked or nacked")
)

// lostError is ErrConnectionLost with the reason the connection broke.
type lostError struct{ cause error }

func (e *lostError) Error() string {
	if e.cause == nil {
		return ErrConnectionLost.Error()
	}
	return fmt.Sprintf("%s: %v", ErrConnectionLost, e.cause)
}
func (e *lostError) Is(target error) bool { return target == ErrConnectionLost }
func (e *lostError) Unwrap() error        { return e.cause }

func protocolError(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrProtocol}, args...)...)
}
