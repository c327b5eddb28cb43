//! Clients on a raw socket with a tiny receive buffer, for what a browser
//! library would never do: send malformed frames, or stop reading.

pub mod sse;
pub mod ws;
