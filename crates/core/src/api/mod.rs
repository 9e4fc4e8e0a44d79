//! Storage behind the public API (the api-gateway's REST and gRPC surfaces): sessions as
//! users create and change them, agent placement, stored answers for idempotent retries,
//! and the change notifications that drive watches.
//!
//! Every user-facing change is one transaction on the caller's connection: the session
//! row moves and its command is enqueued ([`crate::CommandQueue::command_enqueue`])
//! together, so a command answered with 202 is committed before the answer leaves.
//! Ownership is part of every statement (`WHERE user_id = …`): another user's session
//! is indistinguishable from a missing one.

pub mod changes;
pub mod idempotency;
pub mod placement;
pub mod sessions;

pub use changes::{Change, ChangeListener, ChangeNote, Snapshot};
pub use idempotency::{IdempotencyClaim, request_fingerprint};
pub use placement::Placement;
pub use sessions::{NewSession, SessionRecord, SessionStop};
