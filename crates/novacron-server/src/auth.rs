//! Authentication: Argon2id password hashes, HS256 session JWTs, and long-lived API tokens.
//!
//! API tokens look like `nct_<token id>_<secret>`; only the SHA-256 of the secret is stored, and
//! the ID makes the lookup a map access instead of a scan.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use novacron_types::{ApiError, ErrorCode, Role, TokenId, UserId};

/// Who is making a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub user: UserId,
    pub username: String,
    pub role: Role,
    /// Set when the request came with an API token.
    pub token: Option<TokenId>,
}

impl Principal {
    /// Fails with 403 unless the principal has at least `needed`.
    pub fn require(&self, needed: Role) -> Result<(), ApiError> {
        if self.role >= needed {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::PermissionDenied,
                format!(
                    "role '{}' may not do this; it needs '{}' or higher",
                    self.role.as_str(),
                    needed.as_str()
                ),
            ))
        }
    }
}

pub fn unauthenticated(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Unauthenticated, message)
}

pub fn hash_password(password: &str) -> Result<String, ApiError> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt =
        SaltString::encode_b64(&salt).map_err(|e| ApiError::internal(format!("salt: {e}")))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::internal(format!("hashing password: {e}")))
}

pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(hash) => Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok(),
        Err(_) => false,
    }
}

/// A random secret as lowercase hex.
pub fn random_secret(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

pub fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Compares two strings in time independent of where they differ.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    /// User ID.
    pub sub: String,
    pub name: String,
    pub role: Role,
    pub iat: i64,
    pub exp: i64,
}

pub fn issue_session(
    secret: &str,
    user: UserId,
    username: &str,
    role: Role,
    now_s: i64,
    ttl_s: i64,
) -> Result<String, ApiError> {
    let claims = Claims {
        sub: user.to_string(),
        name: username.to_string(),
        role,
        iat: now_s,
        exp: now_s + ttl_s,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| ApiError::internal(format!("signing session: {e}")))
}

pub fn verify_session(secret: &str, token: &str) -> Result<Claims, ApiError> {
    let mut v = Validation::new(Algorithm::HS256);
    v.leeway = 5;
    jsonwebtoken::decode::<Claims>(token, &DecodingKey::from_secret(secret.as_bytes()), &v)
        .map(|d| d.claims)
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => {
                unauthenticated("the session has expired; log in again")
            }
            _ => unauthenticated("the bearer token is not valid"),
        })
}

pub const API_TOKEN_PREFIX: &str = "nct_";

pub fn format_api_token(id: TokenId, secret: &str) -> String {
    format!("{API_TOKEN_PREFIX}{}_{secret}", id.0.simple())
}

/// Splits `nct_<id>_<secret>`.
pub fn parse_api_token(token: &str) -> Option<(TokenId, &str)> {
    let rest = token.strip_prefix(API_TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let id = uuid::Uuid::try_parse(id).ok()?;
    (!secret.is_empty()).then_some((TokenId(id), secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_hashes_verify_only_the_right_password() {
        let h = hash_password("correct horse").expect("hash");
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("wrong horse", &h));
        assert!(!verify_password("correct horse", "garbage"));
    }

    #[test]
    fn sessions_verify_with_their_secret_only_and_expire() {
        let user = UserId::new_random();
        let now = 1_700_000_000;
        let t = issue_session("k1", user, "alice", Role::Operator, now, 3600).expect("jwt");
        // Far in the past: expired, whatever the clock says now.
        let e = verify_session("k1", &t).expect_err("expired");
        assert!(e.message.contains("expired"), "{e:?}");
        let fresh =
            issue_session("k1", user, "alice", Role::Operator, time_now(), 3600).expect("jwt");
        let c = verify_session("k1", &fresh).expect("valid");
        assert_eq!((c.name.as_str(), c.role), ("alice", Role::Operator));
        assert!(verify_session("k2", &fresh).is_err(), "other secret");
        assert!(verify_session("k1", "not.a.jwt").is_err());
    }

    fn time_now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    #[test]
    fn api_tokens_round_trip_and_reject_garbage() {
        let id = TokenId::new_random();
        let t = format_api_token(id, "abc123");
        assert_eq!(parse_api_token(&t), Some((id, "abc123")));
        for bad in [
            "",
            "nct_",
            "nct_x_y",
            "xyz_abc",
            &format!("nct_{}_", id.0.simple()),
        ] {
            assert_eq!(parse_api_token(bad), None, "{bad}");
        }
        assert!(constant_time_eq("abc", "abc") && !constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "abcd"));
    }

    #[test]
    fn roles_are_ordered() {
        let p = Principal {
            user: UserId::new_random(),
            username: "v".into(),
            role: Role::Viewer,
            token: None,
        };
        assert!(p.require(Role::Viewer).is_ok());
        assert_eq!(
            p.require(Role::Operator).expect_err("403").code,
            ErrorCode::PermissionDenied
        );
    }
}
