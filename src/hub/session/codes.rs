//! The protocol's vocabulary, whatever the transport: how a client is
//! connected, the codes of its error frames and events (with when to ask
//! again, for a refusal that is only for now), why a connection was cut
//! off, and the `reset` frame.

use std::time::Duration;

use serde_json::json;

use crate::update::ResetReason;

/// How a client is connected; also the `transport` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Sse,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::WebSocket => "ws",
            Transport::Sse => "sse",
        }
    }
}

/// What a client did wrong (or why it must retry); the `code` of its
/// error frame or event, and the `code` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientErrorCode {
    BadJson,
    BadFrame,
    UnknownOp,
    BadPattern,
    TooManySubscriptions,
    RateLimited,
    BinaryNotSupported,
    Busy,
    Unavailable,
    /// A pattern outside the connection's grant.
    Forbidden,
    /// A token that does not verify.
    Unauthorized,
    TokenExpired,
    /// The client fell too far behind and was cut off; it resumes from its
    /// last offset when it reconnects.
    SlowConsumer,
}

impl ClientErrorCode {
    /// Every code, as the protocol's schema lists them.
    pub const ALL: [ClientErrorCode; 13] = [
        ClientErrorCode::BadJson,
        ClientErrorCode::BadFrame,
        ClientErrorCode::UnknownOp,
        ClientErrorCode::BadPattern,
        ClientErrorCode::TooManySubscriptions,
        ClientErrorCode::RateLimited,
        ClientErrorCode::BinaryNotSupported,
        ClientErrorCode::Busy,
        ClientErrorCode::Unavailable,
        ClientErrorCode::Forbidden,
        ClientErrorCode::Unauthorized,
        ClientErrorCode::TokenExpired,
        ClientErrorCode::SlowConsumer,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ClientErrorCode::BadJson => "bad_json",
            ClientErrorCode::BadFrame => "bad_frame",
            ClientErrorCode::UnknownOp => "unknown_op",
            ClientErrorCode::BadPattern => "bad_pattern",
            ClientErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ClientErrorCode::RateLimited => "rate_limited",
            ClientErrorCode::BinaryNotSupported => "binary_not_supported",
            ClientErrorCode::Busy => "busy",
            ClientErrorCode::Unavailable => "unavailable",
            ClientErrorCode::Forbidden => "forbidden",
            ClientErrorCode::Unauthorized => "unauthorized",
            ClientErrorCode::TokenExpired => "token_expired",
            ClientErrorCode::SlowConsumer => "slow_consumer",
        }
    }
}

/// An error a client caused; it gets a frame or event with this code.
#[derive(Debug, Clone)]
pub struct ClientError {
    pub code: ClientErrorCode,
    pub message: String,
    /// When to ask again, for a refusal that is only for now (`busy`,
    /// `unavailable`): the frame's `retry_ms`.
    pub retry: Option<Duration>,
}

impl ClientError {
    pub fn new(code: ClientErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry: None,
        }
    }

    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry = Some(after);
        self
    }

    pub fn to_json(&self) -> String {
        let mut v = json!({ "type": "error", "code": self.code.as_str(), "message": self.message });
        if let Some(retry) = self.retry {
            v["retry_ms"] = json!(retry.as_millis() as u64);
        }
        v.to_string()
    }
}

/// Why a connected client was cut off; the `reason` label of
/// `clients_refused`, beside the hub's [`Refused`] at connect time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    FrameTooLarge,
    ProtocolError,
    TooManyErrors,
    HeartbeatTimeout,
}

impl Dropped {
    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::FrameTooLarge => "frame_too_large",
            Dropped::ProtocolError => "protocol_error",
            Dropped::TooManyErrors => "too_many_errors",
            Dropped::HeartbeatTimeout => "heartbeat_timeout",
        }
    }
}

pub fn reset_json(offset: u64, reason: ResetReason) -> serde_json::Value {
    json!({ "type": "reset", "offset": offset, "reason": reason.as_str(), "message": reason.message() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_own_name() {
        let names: std::collections::HashSet<&str> = ClientErrorCode::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(names.len(), ClientErrorCode::ALL.len());
    }

    #[test]
    fn a_refusal_for_now_says_when_to_ask_again_and_others_do_not() {
        let busy: serde_json::Value = serde_json::from_str(
            &ClientError::new(ClientErrorCode::Busy, "later")
                .retry_after(Duration::from_millis(1500))
                .to_json(),
        )
        .unwrap();
        assert_eq!(busy["code"], "busy");
        assert_eq!(busy["retry_ms"], 1500);
        let bad: serde_json::Value =
            serde_json::from_str(&ClientError::new(ClientErrorCode::BadJson, "no").to_json()).unwrap();
        assert!(bad.get("retry_ms").is_none(), "{bad}");
    }
}
