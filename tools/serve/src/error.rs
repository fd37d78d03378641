//! Errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// One failed request: its status and what to tell the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A stable machine-readable name; also the `outcome` label in `/metrics`.
    pub code: &'static str,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code,
        }
    }

    /// A 400 about one parameter.
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            param: Some(param.to_string()),
            ..ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_ready() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "model_loading",
            "the model is still loading; retry when GET /health returns 200",
        )
    }

    /// OpenAI's answer to a `model` it does not serve (the name is cut short
    /// in the message, so a long one is not echoed back).
    pub fn model_not_found(asked: &str, served: &str) -> Self {
        let shown: String = asked.chars().take(64).collect();
        let cut = if shown.len() < asked.len() { "..." } else { "" };
        ApiError {
            param: Some("model".into()),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!("The model `{shown}{cut}` does not exist: this server serves `{served}` only"),
            )
        }
    }

    /// The OpenAI `type` of this status.
    fn kind(&self) -> &'static str {
        if self.code == "model_not_found" {
            // As OpenAI types it.
            return "invalid_request_error";
        }
        match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

/// Seconds a client told to come back (429, 503) should wait first.
pub const RETRY_AFTER_SECS: u32 = 1;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(self.body())).into_response();
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        // The logging layer reads the outcome from here.
        response.extensions_mut().insert(Outcome(self.code));
        response
    }
}

/// How a request ended, for the log line and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome(pub &'static str);
