//! Stage 3, broadcast: the relay that publishes the update outbox (which
//! apply writes in its transaction) to the update stream in commit order
//! with confirms, and the stream readers that hand every update to whoever
//! listens (an `UpdateSink`: the hub) and read the stream back for resumes.

pub(crate) mod relay;
pub mod stream;
