//! On an admitted node: every few seconds, admits the nodes that wait with
//! a valid join token (`cluster::by_token`), each admission audited with
//! the token's id. Any member may; the membership lock makes one do it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tracing::warn;

use crate::audit::{self, AuditAction, AuditEntry};
use crate::cluster::by_token;
use crate::identity::NodeIdentity;
use crate::postgres::pool::RoleAwarePool;
use crate::postgres::tls::Endpoint;
use crate::shutdown::Shutdown;

/// How often a member looks for nodes waiting with a token.
const LOOK_EVERY: Duration = Duration::from_secs(2);

pub struct TokenAdmission {
    pub superuser: Endpoint,
    pub identity: Arc<NodeIdentity>,
    pub pool: RoleAwarePool,
    pub node_id: String,
}

impl TokenAdmission {
    pub async fn run(self, mut stop: Shutdown) {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(LOOK_EVERY) => {}
                _ = stop.requested() => return,
            }
            let started = Instant::now();
            let admitted = async {
                let mut client = self.superuser.connect().await?;
                by_token::admit_by_tokens(&mut client, &self.identity).await
            };
            match admitted.await {
                Ok(admitted) => {
                    failing = false;
                    for (node, token) in admitted {
                        let entry = AuditEntry {
                            action: AuditAction::ClusterJoin,
                            rows_affected: 1,
                            duration: started.elapsed(),
                            source_component: "cluster",
                            metadata: json!({"node": node, "token": token}),
                        };
                        if let Err(e) = audit::record_alone(&self.pool, &self.node_id, &entry).await
                        {
                            warn!(error = %e, node, token, "cluster: the admission by join token is not in the audit trail");
                        }
                    }
                }
                Err(e) if !failing => {
                    warn!(error = %e, "cluster: cannot look for nodes waiting with a join token; retrying");
                    failing = true;
                }
                Err(_) => {}
            }
        }
    }
}
