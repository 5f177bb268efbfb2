// The client's error classes: one per wire error code (PROTOCOL.md, "Errors"), plus the errors
// the client raises itself when the connection is lost, the client is closed, or a wait times out.

/** A map in an error's `details`, e.g. `{field, message}` or `{path, message}`. */
export type ErrorDetail = Record<string, unknown>;

/** The wire error codes of protocol version 1. */
export const WIRE_CODES = [
  "bad_frame",
  "frame_too_large",
  "bad_request",
  "unknown_op",
  "unsupported_protocol",
  "validation_failed",
  "unknown_version",
  "incompatible_schema",
  "unknown_tag",
  "not_found",
  "backpressure",
  "unavailable",
  "unauthorized",
  "internal",
] as const;

/** A wire error code, or one of the client's own codes. */
export type ErrorCode = (typeof WIRE_CODES)[number] | "connection_lost" | "closed" | "timeout";

/**
 * The base of every error this library throws. `code` is the contract (PROTOCOL.md says a
 * message may change); `details` holds the daemon's list of maps, e.g. one `{path, message}` per
 * schema violation.
 */
export class SidebusError extends Error {
  readonly code: ErrorCode;
  readonly details: ErrorDetail[];
  /** The `id` of the request the daemon answered, when the error is a reply. */
  readonly requestId: number | string | undefined;

  constructor(code: ErrorCode, message: string, details: ErrorDetail[] = [], requestId?: number | string, options?: ErrorOptions) {
    super(message, options);
    this.name = new.target.name;
    this.code = code;
    this.details = details;
    this.requestId = requestId;
  }
}

/** The body is not one MessagePack map with string keys. */
export class BadFrameError extends SidebusError {
  constructor(message: string, details: ErrorDetail[] = [], requestId?: number | string) {
    super("bad_frame", message, details, requestId);
  }
}
/** A frame is larger than `max_frame_bytes`; the daemon closes the connection after it. */
export class FrameTooLargeError extends SidebusError {
  constructor(message: string, details: ErrorDetail[] = [], requestId?: number | string) {
    super("frame_too_large", message, details, requestId);
  }
}
/** A field is missing, of the wrong type or out of range; `details` names it (`{field, message}`). */
export class BadRequestError extends SidebusError {
  constructor(message: string, details: ErrorDetail[] = [], requestId?: number | string) {
    super("bad_request", message, details, requestId);
  }
}
/** The op names no operation this daemon knows. */
export class UnknownOpError extends SidebusError {
  constructor(message: string, details: ErrorDetail[] = [], requestId?: number | string) {
    super("unknown_op", message, details, requestId);
  }
}
/** The daemon does not speak the protocol version `hello` asked for. */
export class UnsupportedProtocolError extends SidebusError {
  constructor(message: string, details: ErrorDetail[] = [], requestId?: number | string) {
    super("unsupported_protocol", message, details, requestId);
  }
}
/** `data` does not match the type's schema; `details` has one `{path, message}` per violation. */
export class ValidationFailedError extends SidebusError {
  constructor(message: string, details: ErrorDetail[] = [], requestId?: number | string) {
    super("validation_failed", message, details, requestId);
  }
}
/** The `version` names no schema version of the type. */
export class UnknownVersionError extends SidebusError {
  constructor(message: string, details: ErrorDetail[] = [], requestId?: number | string) {
    super("unknown_version", message, details, requestId);
  }
}
/** A schema would break the type's compatibility mode; `details` has one `{message}` per change. */
export class IncompatibleSchemaError extends SidebusError {
  constructor(message: string, details: ErrorDetail[] = [], requestId?: number | string) {
    super("incompatible_schema", message, details, requestId);
  }
}
/** The connection does not hold that delivery tag (never sent, already ended, or expired). */
export class UnknownTagError extends SidebusError {
  constructor(message: string, details: ErrorDetail[] = [], requestId?: number | string) {
    super("unknown_tag", message, details, requestId);
  }
}
/** No such subscription, group, dead letter or replay. */
export class NotFoundError extends SidebusError {
  constructor(message: string, details: ErrorDetail[] = [], requestId?: number | string) {
    super("not_found", message, details, requestId);
  }
}
/** The daemon's spool is full: nothing was accepted; retry later. */
export class BackpressureError extends SidebusError {
  constructor(message: string, details: ErrorDetail[] = [], requestId?: number | string) {
    super("backpressure", message, details, requestId);
  }
}
/**
 * The daemon cannot do it now. For a `committed` publish the event is spooled and will be
 * stored; retrying with the same `eventId` is safe.
 */
export class UnavailableError extends SidebusError {
  constructor(message: string, details: ErrorDetail[] = [], requestId?: number | string) {
    super("unavailable", message, details, requestId);
  }
}
/** The peer may not do this. */
export class UnauthorizedError extends SidebusError {
  constructor(message: string, details: ErrorDetail[] = [], requestId?: number | string) {
    super("unauthorized", message, details, requestId);
  }
}
/** A fault in the daemon (or a code this client does not know, which PROTOCOL.md says to treat so). */
export class InternalError extends SidebusError {
  constructor(message: string, details: ErrorDetail[] = [], requestId?: number | string) {
    super("internal", message, details, requestId);
  }
}

/**
 * The connection broke while the request was in flight (or before it could be written). The
 * request may or may not have reached the daemon: a publish is never re-sent by the client, so
 * retry it yourself with the same `eventId` if it must not be stored twice.
 */
export class ConnectionLostError extends SidebusError {
  constructor(message: string, options?: ErrorOptions) {
    super("connection_lost", message, [], undefined, options);
  }
}

/** The client was closed. */
export class ClientClosedError extends SidebusError {
  constructor(message = "the client is closed") {
    super("closed", message);
  }
}

/** A request waited longer than allowed for the client to reconnect, or `close()` timed out. */
export class TimeoutError extends SidebusError {
  constructor(message: string) {
    super("timeout", message);
  }
}

type WireErrorClass = new (message: string, details?: ErrorDetail[], requestId?: number | string) => SidebusError;

const BY_CODE: Record<(typeof WIRE_CODES)[number], WireErrorClass> = {
  bad_frame: BadFrameError,
  frame_too_large: FrameTooLargeError,
  bad_request: BadRequestError,
  unknown_op: UnknownOpError,
  unsupported_protocol: UnsupportedProtocolError,
  validation_failed: ValidationFailedError,
  unknown_version: UnknownVersionError,
  incompatible_schema: IncompatibleSchemaError,
  unknown_tag: UnknownTagError,
  not_found: NotFoundError,
  backpressure: BackpressureError,
  unavailable: UnavailableError,
  unauthorized: UnauthorizedError,
  internal: InternalError,
};

/**
 * The typed error for a wire `error` frame. A code this client does not know becomes an
 * `InternalError` (as PROTOCOL.md asks), with the daemon's code kept in the message so that
 * nothing is lost.
 */
export function errorFromWire(frame: Record<string, unknown>): SidebusError {
  const code = typeof frame.code === "string" ? frame.code : "internal";
  const message = typeof frame.message === "string" ? frame.message : code;
  const details = Array.isArray(frame.details)
    ? frame.details.filter((d): d is ErrorDetail => typeof d === "object" && d !== null && !Array.isArray(d))
    : [];
  const id = typeof frame.id === "number" || typeof frame.id === "string" ? frame.id : undefined;
  const cls = Object.prototype.hasOwnProperty.call(BY_CODE, code) ? BY_CODE[code as keyof typeof BY_CODE] : undefined;
  if (cls === undefined) {
    return new InternalError(`${code}: ${message}`, details, id);
  }
  return new cls(message, details, id);
}
