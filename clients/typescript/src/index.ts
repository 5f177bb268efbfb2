// The public API of @sidebus/client: the client, subscriptions and deliveries, the typed errors,
// the option and reply types, and the wire codec (for tests and tools that speak the protocol).

export { Client, PROTOCOL_VERSION, defaultSocketPath } from "./client.js";
export { Delivery, Subscription, type Handler } from "./subscription.js";
export * from "./errors.js";
export type * from "./types.js";
export {
  decodeFrame,
  decodeRequest,
  decodeValue,
  encodeFrame,
  encodeValue,
  FrameReader,
  OPS_WITHOUT_ID,
  type DecodedRequest,
  type Frame,
} from "./codec.js";
