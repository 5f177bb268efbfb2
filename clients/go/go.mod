// The Go client library of sidebus. The replace directives build it offline against Debian's
// source tree of the MessagePack library (golang-github-vmihailenco-msgpack.v5-dev); they apply
// only when this module is the main module, so `go get` users fetch the required versions.
module github.com/sidebus/sidebus/clients/go

go 1.19

require (
	github.com/vmihailenco/msgpack/v5 v5.3.5
	github.com/vmihailenco/tagparser/v2 v2.0.0 // indirect
)

replace github.com/vmihailenco/msgpack/v5 => /usr/share/gocode/src/github.com/vmihailenco/msgpack/v5

replace github.com/vmihailenco/tagparser/v2 => /usr/share/gocode/src/github.com/vmihailenco/tagparser/v2
