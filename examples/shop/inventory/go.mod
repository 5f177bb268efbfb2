// The inventory service of the example shop (Go). It uses the client in this repository and,
// like it, builds offline against Debian's MessagePack source tree.
module github.com/sidebus/sidebus/examples/shop/inventory

go 1.19

require (
	github.com/sidebus/sidebus/clients/go v0.0.0
	github.com/vmihailenco/msgpack/v5 v5.3.5 // indirect
	github.com/vmihailenco/tagparser/v2 v2.0.0 // indirect
)

replace github.com/sidebus/sidebus/clients/go => ../../../clients/go

replace github.com/vmihailenco/msgpack/v5 => /usr/share/gocode/src/github.com/vmihailenco/msgpack/v5

replace github.com/vmihailenco/tagparser/v2 => /usr/share/gocode/src/github.com/vmihailenco/tagparser/v2
