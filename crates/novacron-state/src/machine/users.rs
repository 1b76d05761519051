//! `apply` for users and API tokens.

use novacron_types::{ApiError, ApiToken, TokenId, User};

use super::ClusterState;
use crate::command::Touched;

impl ClusterState {
    pub(super) fn create_user(&mut self, user: &User) -> Result<Vec<Touched>, ApiError> {
        if self.users.contains_key(&user.id) || self.user_by_name(&user.username).is_some() {
            return Err(ApiError::conflict(format!(
                "a user named '{}' already exists",
                user.username
            )));
        }
        self.users.insert(user.id, user.clone());
        Ok(vec![Touched::User(user.id)])
    }

    pub(super) fn create_token(&mut self, token: &ApiToken) -> Result<Vec<Touched>, ApiError> {
        if !self.users.contains_key(&token.user) {
            return Err(ApiError::not_found("user", token.user));
        }
        if self.tokens.contains_key(&token.id) {
            return Err(ApiError::conflict(format!(
                "token ID {} already exists",
                token.id
            )));
        }
        self.tokens.insert(token.id, token.clone());
        Ok(vec![Touched::Token(token.id)])
    }

    pub(super) fn revoke_token(&mut self, id: &TokenId) -> Result<Vec<Touched>, ApiError> {
        let token = self
            .tokens
            .get_mut(id)
            .ok_or_else(|| ApiError::not_found("token", id))?;
        token.revoked = true;
        Ok(vec![Touched::Token(*id)])
    }
}
