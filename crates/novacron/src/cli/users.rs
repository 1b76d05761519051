//! `novacron token ...` and `novacron user ...`: API tokens and users.

use clap::Subcommand;

use novacron_client::encode;

use super::common::{Global, client, read_password};
use crate::output::{self, Format};

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    Create {
        name: String,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    List,
    Revoke {
        id: String,
    },
}

pub(crate) async fn token(g: &Global, cmd: TokenCommand) -> anyhow::Result<()> {
    let c = client(g)?;
    match cmd {
        TokenCommand::Create {
            name,
            role,
            expires_in_days,
        } => {
            let body =
                serde_json::json!({"name": name, "role": role, "expires_in_days": expires_in_days});
            let created: serde_json::Value = c.post("/api/v1/tokens", &body).await?;
            if g.output == Format::Json {
                return output::json(&created);
            }
            println!("{}", created["token"].as_str().unwrap_or_default());
            eprintln!("(the token is shown once; store it now)");
            Ok(())
        }
        TokenCommand::List => {
            let tokens: Vec<serde_json::Value> = c.list_all("/api/v1/tokens").await?;
            if g.output == Format::Json {
                return output::json(&tokens);
            }
            let s = |v: &serde_json::Value| v.to_string().trim_matches('"').to_string();
            let rows = tokens
                .iter()
                .map(|t| vec![s(&t["id"]), s(&t["name"]), s(&t["role"]), s(&t["revoked"])])
                .collect();
            output::table(&["ID", "NAME", "ROLE", "REVOKED"], rows);
            Ok(())
        }
        TokenCommand::Revoke { id } => {
            c.delete(&format!("/api/v1/tokens/{}", encode(&id))).await?;
            eprintln!("revoked token {id}");
            Ok(())
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    Create {
        username: String,
        #[arg(long, default_value = "viewer")]
        role: String,
        #[arg(long)]
        password_stdin: bool,
    },
    List,
}

pub(crate) async fn user(g: &Global, cmd: UserCommand) -> anyhow::Result<()> {
    let c = client(g)?;
    match cmd {
        UserCommand::Create {
            username,
            role,
            password_stdin,
        } => {
            let password = read_password(&format!("Password for {username}: "), password_stdin)?;
            let body =
                serde_json::json!({"username": username, "password": password, "role": role});
            let user: serde_json::Value = c.post("/api/v1/users", &body).await?;
            if g.output == Format::Json {
                return output::json(&user);
            }
            eprintln!("created user {username} ({role})");
            Ok(())
        }
        UserCommand::List => {
            let users: Vec<serde_json::Value> = c.list_all("/api/v1/users").await?;
            if g.output == Format::Json {
                return output::json(&users);
            }
            let s = |v: &serde_json::Value| v.to_string().trim_matches('"').to_string();
            let rows = users
                .iter()
                .map(|u| vec![s(&u["username"]), s(&u["role"]), s(&u["id"])])
                .collect();
            output::table(&["USERNAME", "ROLE", "ID"], rows);
            Ok(())
        }
    }
}
