//! Maintenance: cluster-wide operations. Status is answered from the backend's
//! real version with synthetic identity; Alarm GET is allowed; everything else would let
//! one tenant read or disturb the whole cluster, so it is refused as etcd refuses a user
//! without permission.

use etcd_client::proto::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::call::{Admit, Caller};
use crate::error::EtcdError;
use crate::limits::Class;
use crate::upstream::request_from;
use crate::{Broker, rewrite};

const SERVICE: &str = "Maintenance";

/// etcd's `AlarmRequest.AlarmAction.GET`.
const ALARM_GET: i32 = 0;

#[tonic::async_trait]
impl PbMaintenanceService for Broker {
    async fn alarm(
        &self,
        req: Request<PbAlarmRequest>,
    ) -> Result<Response<PbAlarmResponse>, Status> {
        let admit = Admit::Handler;
        self.call(SERVICE, "Alarm", admit, req, |c, r| async move {
            let Caller { t, md } = c;
            if r.action != ALARM_GET {
                return Err(self.deny(Some(&t), "Alarm", EtcdError::PermissionDenied));
            }
            let _permit = self.limiter().admit(&t, Class::Read, "Alarm")?;
            let mut resp: PbAlarmResponse = t
                .upstream
                .unary("/etcdserverpb.Maintenance/Alarm", request_from(&md, r))
                .await?
                .into_inner();
            self.note(&resp.header);
            rewrite::scrub_header(&mut resp.header);
            // A NOSPACE alarm concerns every tenant, so it is shown, but not which member.
            for a in &mut resp.alarms {
                a.member_id = rewrite::MEMBER_ID;
            }
            Ok(resp)
        })
        .await
    }

    async fn status(
        &self,
        req: Request<PbStatusRequest>,
    ) -> Result<Response<PbStatusResponse>, Status> {
        let admit = Admit::InFlight(Class::Read);
        self.call(SERVICE, "Status", admit, req, |c, r| async move {
            let Caller { t, md } = c;
            let used = self.limiter().usage_for_status(&t).await?;
            let real: PbStatusResponse = t
                .upstream
                .unary("/etcdserverpb.Maintenance/Status", request_from(&md, r))
                .await?
                .into_inner();
            self.note(&real.header);
            let mut header = real.header;
            rewrite::scrub_header(&mut header);
            let revision = header.as_ref().map_or(0, |h| h.revision) as u64;
            // Clients gate features on the version (the apiserver enables progress
            // requests by it), so it is the backend's own. Sizes are the tenant's own
            // (live keys and values, see limits); the rest reveals nothing.
            let db_size = used.bytes;
            Ok(PbStatusResponse {
                header,
                version: real.version,
                db_size,
                leader: rewrite::MEMBER_ID,
                raft_index: revision,
                raft_term: rewrite::RAFT_TERM,
                raft_applied_index: revision,
                errors: Vec::new(),
                db_size_in_use: db_size,
                is_learner: false,
                storage_version: real.storage_version,
                db_size_quota: t.limits.bytes.map_or(0, |b| b as i64),
                downgrade_info: None,
            })
        })
        .await
    }

    async fn defragment(
        &self,
        req: Request<PbDefragmentRequest>,
    ) -> Result<Response<PbDefragmentResponse>, Status> {
        self.refuse(SERVICE, "Defragment", req).await
    }

    async fn hash(&self, req: Request<PbHashRequest>) -> Result<Response<PbHashResponse>, Status> {
        self.refuse(SERVICE, "Hash", req).await
    }

    async fn hash_kv(
        &self,
        req: Request<PbHashKvRequest>,
    ) -> Result<Response<PbHashKvResponse>, Status> {
        self.refuse(SERVICE, "HashKV", req).await
    }

    type SnapshotStream = ReceiverStream<Result<PbSnapshotResponse, Status>>;

    async fn snapshot(
        &self,
        req: Request<PbSnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        self.refuse(SERVICE, "Snapshot", req).await
    }

    async fn move_leader(
        &self,
        req: Request<PbMoveLeaderRequest>,
    ) -> Result<Response<PbMoveLeaderResponse>, Status> {
        self.refuse(SERVICE, "MoveLeader", req).await
    }

    async fn downgrade(
        &self,
        req: Request<PbDowngradeRequest>,
    ) -> Result<Response<PbDowngradeResponse>, Status> {
        self.refuse(SERVICE, "Downgrade", req).await
    }
}
