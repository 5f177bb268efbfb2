//! One module per request kind. Each adds its handler to the connection (`Conn::op_*`): it
//! checks what the parser could not (state of the connection, limits), does the work, and
//! queues the reply.

mod admin;
mod hello;
mod publish;
mod schema;
mod settle;
mod subscribe;
