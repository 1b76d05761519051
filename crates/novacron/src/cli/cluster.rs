//! `novacron cluster ...`: join tokens, status, removal and leadership.

use clap::Subcommand;

use novacron_server::cluster::status::{ClusterStatus, LeaderRef};
use novacron_server::service::{JoinTokenCreated, JoinTokenRequest};
use novacron_types::HostRole;

use super::common::{Global, client};
use crate::output::{self, Format};

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Issue a one-time join token for a new host.
    Token {
        /// full or witness.
        #[arg(long, default_value = "full")]
        role: HostRole,
        /// Seconds until the token expires.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
    /// Every member: role, health, Raft progress, what it reaches; the leader and quorum.
    Status {
        /// This host's own view, without asking the leader.
        #[arg(long)]
        stale: bool,
    },
    /// Remove a host from the cluster (for good: it must be wiped to join again).
    Remove {
        /// Host ID.
        node: u64,
        /// Remove a host that is down (its VMs are marked unknown).
        #[arg(long)]
        force: bool,
    },
    /// Hand Raft leadership to another voter (default: the healthiest).
    Leader {
        #[arg(long)]
        to: Option<u64>,
    },
}

pub async fn run(g: &Global, c: ClusterCommand) -> anyhow::Result<()> {
    let api = client(g)?;
    match c {
        ClusterCommand::Token { role, ttl } => {
            let t: JoinTokenCreated = api
                .post(
                    "/api/v1/cluster/tokens",
                    &JoinTokenRequest {
                        role: Some(role),
                        ttl_seconds: Some(ttl),
                    },
                )
                .await?;
            if g.output == Format::Json {
                return output::json(&t);
            }
            println!("{}", t.token);
            eprintln!(
                "One-time {} join token, valid until {}. On the new host run:\n  novacron serve --join {} --token {}",
                t.role.as_str(),
                output::millis(t.expires_at),
                api.base(),
                t.token
            );
            Ok(())
        }
        ClusterCommand::Status { stale } => {
            let path = if stale {
                "/api/v1/cluster?consistency=stale"
            } else {
                "/api/v1/cluster"
            };
            let s: ClusterStatus = api.get(path).await?;
            if g.output == Format::Json {
                return output::json(&s);
            }
            print_status(&s);
            Ok(())
        }
        ClusterCommand::Remove { node, force } => {
            let path = format!("/api/v1/cluster/members/{node}?force={force}");
            api.delete(&path).await?;
            eprintln!("Removed host {node}.");
            Ok(())
        }
        ClusterCommand::Leader { to } => {
            let l: LeaderRef = api
                .post("/api/v1/cluster/leader", &serde_json::json!({ "to": to }))
                .await?;
            if g.output == Format::Json {
                return output::json(&l);
            }
            println!("Leader is now host {} ({}).", l.id, l.api_address);
            Ok(())
        }
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

/// What the voters line says: how many vote (and, in the leader's view, how many of them are
/// online: reachable), whether they make a quorum, and the target when the cluster has fewer voters than
/// it aims for (it promotes hosts as they join).
fn quorum_line(s: &ClusterStatus) -> String {
    let plural = if s.voters == 1 { "" } else { "s" };
    let voters = s.members.iter().filter(|m| m.voting);
    let knows_health = voters.clone().all(|m| m.health != "unknown");
    let mut line = format!("quorum: {}", if s.quorum { "yes" } else { "NO" });
    if knows_health {
        let online = voters.filter(|m| m.health == "online").count();
        line.push_str(&format!(
            " ({online} of {} voter{plural} reachable)",
            s.voters
        ));
    } else {
        line.push_str(&format!(" ({} voter{plural})", s.voters));
    }
    if s.voters < s.target_voters {
        line.push_str(&format!(
            "; target {} voters as more hosts join",
            s.target_voters
        ));
    }
    line
}

fn print_status(s: &ClusterStatus) {
    match &s.leader {
        Some(l) => println!(
            "Leader: host {} ({}), term {}, {} (as seen by host {})",
            l.id,
            l.api_address,
            s.term,
            quorum_line(s),
            s.reported_by
        ),
        None => println!(
            "No leader known (term {}), quorum: NO (as seen by host {})",
            s.term, s.reported_by
        ),
    }
    if s.local.isolated {
        println!("Host {} is ISOLATED and has fenced its VMs.", s.local.node);
    }
    let rows = s
        .members
        .iter()
        .map(|m| {
            let reaches = if m.reaches.is_empty() {
                "-".to_string()
            } else {
                m.reaches
                    .iter()
                    .map(|(p, ok)| format!("{p}{}", if *ok { "" } else { "✗" }))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            vec![
                m.id.to_string(),
                m.name.clone(),
                m.role.clone(),
                m.health.clone(),
                m.api_address.clone(),
                opt(m.matched_index),
                opt(m.lag),
                opt(m.last_heartbeat_ms_ago.map(|ms| format!("{ms}ms"))),
                reaches,
            ]
        })
        .collect();
    output::table(
        &[
            "ID", "NAME", "ROLE", "HEALTH", "API", "MATCHED", "LAG", "HEARD", "REACHES",
        ],
        rows,
    );
}
