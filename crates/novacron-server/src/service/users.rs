//! Users, sessions and API tokens.

use std::time::Duration;

use novacron_state::CommandV1;
use novacron_types::{
    ApiError, ApiToken, Role, TokenId, TokenView, User, UserId, UserView, now_millis, validate,
};

use super::Service;
use crate::auth::{self, Principal, unauthenticated};

/// The answer to a successful login.
pub struct Session {
    pub token: String,
    pub expires_at: i64,
    pub role: Role,
}

impl Service {
    fn jwt_secret(&self) -> Result<String, ApiError> {
        let secret = self.inner.state.read(|s| s.meta.jwt_secret.clone());
        if secret.is_empty() {
            return Err(ApiError::unavailable("the cluster is not initialized yet"));
        }
        Ok(secret)
    }

    pub async fn login(&self, username: &str, password: &str) -> Result<Session, ApiError> {
        use std::sync::atomic::Ordering;
        let user = self.inner.state.read(|s| s.user_by_name(username).cloned());
        // Argon2 takes ~19 MiB and tens of milliseconds per attempt: bound how many run at once.
        // The permit moves into the blocking task, so a client that disconnects cannot free it
        // while its hash still runs. A name that does not exist queues the same way, so timing
        // under load does not tell which names exist (floods are bounded per client address
        // before they get here).
        let permit = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            self.inner.login_permits.clone().acquire_owned(),
        )
        .await
        .map_err(|_| ApiError::unavailable("too many logins at once; retry shortly"))?
        .map_err(|_| ApiError::unavailable("shutting down"))?;
        let Some(hash) = user.as_ref().map(|u| u.password_hash.clone()) else {
            // No such user: hold the place about as long as a check takes, but spend no CPU.
            let typical = self.inner.hash_micros.load(Ordering::Relaxed);
            let jitter = rand::random_range(0..=typical / 5);
            tokio::time::sleep(std::time::Duration::from_micros(typical + jitter)).await;
            drop(permit);
            return Err(unauthenticated("invalid username or password"));
        };
        let password = password.to_string();
        let (ok, took) = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let started = std::time::Instant::now();
            let ok = auth::verify_password(&password, &hash);
            (ok, started.elapsed())
        })
        .await
        .unwrap_or((false, std::time::Duration::ZERO));
        if !took.is_zero() {
            // An exponential moving average (weight 1/8) of recent checks.
            let micros = took.as_micros().min(u128::from(u32::MAX)) as u64;
            let _ =
                self.inner
                    .hash_micros
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |avg| {
                        Some(avg - avg / 8 + micros / 8)
                    });
        }
        let user = match (ok, user) {
            (true, Some(u)) => u,
            _ => return Err(unauthenticated("invalid username or password")),
        };
        let now_s = now_millis() / 1000;
        let ttl = self.inner.settings.session_ttl.as_secs() as i64;
        let token = auth::issue_session(
            &self.jwt_secret()?,
            user.id,
            &user.username,
            user.role,
            now_s,
            ttl,
        )?;
        Ok(Session {
            token,
            expires_at: (now_s + ttl) * 1000,
            role: user.role,
        })
    }

    /// Resolves a bearer credential (session JWT or API token) to a principal.
    pub fn authenticate(&self, bearer: &str) -> Result<Principal, ApiError> {
        if let Some((id, secret)) = auth::parse_api_token(bearer) {
            let found = self.inner.state.read(|s| {
                s.tokens
                    .get(&id)
                    .cloned()
                    .and_then(|t| s.users.get(&t.user).cloned().map(|u| (t, u)))
            });
            let (token, user) = found.ok_or_else(|| unauthenticated("unknown API token"))?;
            if !auth::constant_time_eq(&auth::sha256_hex(secret), &token.secret_sha256) {
                return Err(unauthenticated("unknown API token"));
            }
            if token.revoked {
                return Err(unauthenticated("the API token has been revoked"));
            }
            if token.expires_at.is_some_and(|e| e <= now_millis()) {
                return Err(unauthenticated("the API token has expired"));
            }
            // A token never grants more than its user has now.
            let role = token.role.min(user.role);
            return Ok(Principal {
                user: user.id,
                username: user.username,
                role,
                token: Some(id),
            });
        }
        let claims = auth::verify_session(&self.jwt_secret()?, bearer)?;
        let user_id: UserId = claims
            .sub
            .parse()
            .map_err(|_| unauthenticated("the bearer token is not valid"))?;
        let user = self
            .inner
            .state
            .read(|s| s.users.get(&user_id).cloned())
            .ok_or_else(|| unauthenticated("the session's user no longer exists"))?;
        Ok(Principal {
            user: user.id,
            username: user.username,
            role: user.role.min(claims.role),
            token: None,
        })
    }

    pub async fn create_user(
        &self,
        username: &str,
        password: &str,
        role: Role,
    ) -> Result<UserView, ApiError> {
        validate::username(username)?;
        validate::password(password)?;
        if self
            .inner
            .state
            .read(|s| s.user_by_name(username).is_some())
        {
            return Err(ApiError::conflict(format!(
                "a user named '{username}' already exists"
            )));
        }
        let password = password.to_string();
        let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??;
        let user = User {
            id: UserId::new_random(),
            username: username.to_string(),
            password_hash: hash,
            role,
            created_at: now_millis(),
        };
        self.inner
            .state
            .propose(CommandV1::CreateUser { user: user.clone() })
            .await?;
        Ok(UserView::from(&user))
    }

    /// Users by name, a page at a time.
    pub async fn list_users(
        &self,
        page: &novacron_types::PageRequest,
    ) -> Result<novacron_types::Page<UserView>, ApiError> {
        self.inner
            .state
            .read_linearizable(|s| {
                let mut users: Vec<&novacron_types::User> = s.users.values().collect();
                users.sort_by(|a, b| a.username.cmp(&b.username));
                page.page(users, |u| u.username.clone())
                    .map(|p| p.map(UserView::from))
            })
            .await?
    }

    /// Creates an API token for the caller; the secret is in the returned string only.
    pub async fn create_token(
        &self,
        who: &Principal,
        name: &str,
        role: Option<Role>,
        expires_in: Option<Duration>,
    ) -> Result<(String, TokenView), ApiError> {
        validate::name("name", name)?;
        if who.token.is_some() {
            // Otherwise a short-lived or narrow token could mint a longer-lived one.
            return Err(ApiError::new(
                novacron_types::ErrorCode::PermissionDenied,
                "API tokens cannot create API tokens; log in with a password",
            ));
        }
        let role = role.unwrap_or(who.role);
        if role > who.role {
            return Err(ApiError::new(
                novacron_types::ErrorCode::PermissionDenied,
                format!(
                    "a '{}' cannot create a token with role '{}'",
                    who.role.as_str(),
                    role.as_str()
                ),
            ));
        }
        let id = TokenId::new_random();
        let secret = auth::random_secret(24);
        let now = now_millis();
        let token = ApiToken {
            id,
            name: name.to_string(),
            user: who.user,
            role,
            secret_sha256: auth::sha256_hex(&secret),
            created_at: now,
            expires_at: expires_in.map(|d| now + d.as_millis() as i64),
            revoked: false,
        };
        self.inner
            .state
            .propose(CommandV1::CreateToken {
                token: token.clone(),
            })
            .await?;
        Ok((auth::format_api_token(id, &secret), TokenView::from(&token)))
    }

    /// API tokens by ID (the caller's own; every user's for an admin), a page at a time.
    pub async fn list_tokens(
        &self,
        who: &Principal,
        page: &novacron_types::PageRequest,
    ) -> Result<novacron_types::Page<TokenView>, ApiError> {
        self.inner
            .state
            .read_linearizable(|s| {
                let mine = s
                    .tokens
                    .values()
                    .filter(|t| who.role == Role::Admin || t.user == who.user);
                page.page(mine, |t| t.id).map(|p| p.map(TokenView::from))
            })
            .await?
    }

    pub async fn revoke_token(&self, who: &Principal, id: &str) -> Result<(), ApiError> {
        let id: TokenId = id.parse().map_err(|_| ApiError::not_found("token", id))?;
        let owner = self.inner.state.read(|s| s.tokens.get(&id).map(|t| t.user));
        match owner {
            None => Err(ApiError::not_found("token", id)),
            Some(u) if u != who.user && who.role != Role::Admin => {
                Err(ApiError::not_found("token", id))
            }
            Some(_) => {
                self.inner
                    .state
                    .propose(CommandV1::RevokeToken { id })
                    .await
            }
        }
    }

    /// On a new cluster: the JWT secret and the first admin. Returns the generated password
    /// when none was given.
    pub async fn bootstrap(
        &self,
        admin_password: Option<String>,
    ) -> Result<Option<String>, ApiError> {
        if self.inner.state.read(|s| s.meta.jwt_secret.is_empty()) {
            self.inner
                .state
                .propose(CommandV1::InitCluster {
                    jwt_secret: auth::random_secret(32),
                    at: now_millis(),
                })
                .await?;
        }
        if self.inner.state.read(|s| !s.users.is_empty()) {
            return Ok(None);
        }
        let (password, generated) = match admin_password {
            Some(p) => (p, false),
            None => (auth::random_secret(12), true),
        };
        self.create_user("admin", &password, Role::Admin).await?;
        Ok(generated.then_some(password))
    }
}
