//! Request extractors whose failures are proper API errors (400 naming the field, 413), never
//! axum's plain-text rejections.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use novacron_types::{ApiError, ErrorCode};

use super::error::HttpError;

/// A JSON body. Decoding errors name the field at fault.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                ct.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("application/json")
            });
        if !json {
            return Err(ApiError::invalid(
                "body",
                "the body must be JSON (Content-Type: application/json)",
            )
            .into());
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                HttpError(ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    "the request body is too large",
                ))
            } else {
                HttpError(ApiError::invalid(
                    "body",
                    format!("cannot read the body: {e}"),
                ))
            }
        })?;
        decode(&bytes).map(JsonBody).map_err(HttpError)
    }
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        let syntax = inner.is_syntax() || inner.is_eof();
        // For a missing field serde reports the parent's path; name the field itself. (For an
        // unknown field the path already ends with it.)
        let missing = msg
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
            .map(|f| {
                if path == "." {
                    f.to_string()
                } else {
                    format!("{path}.{f}")
                }
            });
        let field = match missing {
            _ if syntax || path == "?" => "body".to_string(),
            Some(f) => f,
            None if path == "." => "body".to_string(),
            None => path,
        };
        let msg = if syntax {
            format!("the body is not valid JSON: {msg}")
        } else {
            format!("{field}: {msg}")
        };
        ApiError::invalid(field, msg)
    })
}

/// Query parameters as strings; handlers parse the ones they know with [`Query::get`].
pub struct Query(pub HashMap<String, String>);

impl<S: Send + Sync> FromRequestParts<S> for Query {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        // An empty value is no value: `?after=` starts at the beginning, `?kind=` filters
        // nothing (as forms and generated clients send them).
        axum::extract::Query::<HashMap<String, String>>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0.into_iter().filter(|(_, v)| !v.is_empty()).collect()))
            .map_err(|e| HttpError(ApiError::invalid("query", format!("bad query string: {e}"))))
    }
}

impl Query {
    /// Parses an optional numeric parameter, rejecting garbage and values over `max`.
    pub fn u64(&self, name: &str, max: u64) -> Result<Option<u64>, ApiError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if n <= max => Ok(Some(n)),
                Ok(_) => Err(ApiError::invalid(
                    name,
                    format!("{name} must be at most {max}"),
                )),
                Err(_) => Err(ApiError::invalid(
                    name,
                    format!("{name} must be a non-negative integer (got '{v}')"),
                )),
            },
        }
    }
}

impl Query {
    /// Parses an optional boolean parameter (`true`/`false`, `1`/`0`).
    pub fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        match self.0.get(name).map(String::as_str) {
            None => Ok(None),
            Some("true" | "1") => Ok(Some(true)),
            Some("false" | "0") => Ok(Some(false)),
            Some(v) => Err(ApiError::invalid(
                name,
                format!("{name} must be true or false (got '{v}')"),
            )),
        }
    }

    /// Refuses parameters this endpoint does not know (a misspelt filter must not silently
    /// return everything).
    pub fn only(&self, known: &[&str]) -> Result<(), ApiError> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(ApiError::invalid(
                k.clone(),
                format!("unknown parameter '{k}' (known: {})", known.join(", ")),
            )),
            None => Ok(()),
        }
    }

    /// `limit` and `after`: which page of a list.
    pub fn page(&self) -> Result<novacron_types::PageRequest, ApiError> {
        let limit = self.u64("limit", u32::MAX as u64)?.map(|l| l as usize);
        novacron_types::PageRequest::new(limit, self.0.get("after").cloned())
    }

    /// `consistency=stale` asks for this host's local view instead of a linearizable read.
    pub fn stale(&self) -> Result<bool, ApiError> {
        match self.0.get("consistency").map(String::as_str) {
            None | Some("linearizable") => Ok(false),
            Some("stale") => Ok(true),
            Some(v) => Err(ApiError::invalid(
                "consistency",
                format!("consistency must be linearizable or stale (got '{v}')"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use novacron_types::CreateVmRequest;

    #[test]
    fn decoding_errors_name_the_field() {
        let cases = [
            (r#"{"image":"demo","vcpus":1,"memory_mib":128}"#, "name"),
            (
                r#"{"name":"a","image":"demo","vcpus":"two","memory_mib":128}"#,
                "vcpus",
            ),
            (
                r#"{"name":"a","image":"demo","vcpus":-1,"memory_mib":128}"#,
                "vcpus",
            ),
            (
                r#"{"name":"a","image":"demo","vcpus":1,"memory_mib":1e99}"#,
                "memory_mib",
            ),
            (
                r#"{"name":"a","image":"demo","vcpus":1,"memory_mib":128,"disks":[{"size_mib":"x"}]}"#,
                "disks[0].size_mib",
            ),
            (
                r#"{"name":"a","image":"demo","vcpus":1,"memory_mib":128,"colour":"red"}"#,
                "colour",
            ),
            (r#"{"name":"a","#, "body"),
            (r#"[]"#, "body"),
        ];
        for (body, field) in cases {
            let e = decode::<CreateVmRequest>(body.as_bytes()).expect_err(body);
            assert_eq!(e.field.as_deref(), Some(field), "{body}: {}", e.message);
            assert_eq!(e.code, ErrorCode::InvalidArgument);
        }
    }
}
