//! Stage 2, apply: the consumer reads events from the apply queues, writes
//! them to PostgreSQL idempotently and monotonically (one transaction per
//! batch, which also records the batch in the update outbox), acks only
//! after commit, and dead-letters with a reason what can never apply. The
//! update outbox is written here, in apply's transaction, and read by the
//! broadcast relay.

pub(crate) mod consumer;
pub(crate) mod dead_letters;
pub(crate) mod outbox;
pub(crate) mod pulse;
pub(crate) mod write;
