//! Cluster: one synthetic member, so auto-syncing clients stay on the address they were
//! given; membership changes are refused.

use etcd_client::proto::*;
use tonic::{Request, Response, Status};

use crate::call::Admit;
use crate::{Broker, rewrite};

const SERVICE: &str = "Cluster";

/// The one member every tenant sees. `client_urls` are the address the client should
/// keep using (the shim's own, or the broker's for direct clients).
pub fn synthetic_member_list(
    header: Option<PbResponseHeader>,
    client_urls: Vec<String>,
) -> PbMemberListResponse {
    PbMemberListResponse {
        header,
        members: vec![PbMember {
            id: rewrite::MEMBER_ID,
            name: "etcd-shim".to_owned(),
            peer_ur_ls: Vec::new(),
            client_ur_ls: client_urls,
            is_learner: false,
        }],
    }
}

#[tonic::async_trait]
impl PbClusterService for Broker {
    async fn member_add(
        &self,
        r: Request<PbMemberAddRequest>,
    ) -> Result<Response<PbMemberAddResponse>, Status> {
        self.refuse(SERVICE, "MemberAdd", r).await
    }
    async fn member_remove(
        &self,
        r: Request<PbMemberRemoveRequest>,
    ) -> Result<Response<PbMemberRemoveResponse>, Status> {
        self.refuse(SERVICE, "MemberRemove", r).await
    }
    async fn member_update(
        &self,
        r: Request<PbMemberUpdateRequest>,
    ) -> Result<Response<PbMemberUpdateResponse>, Status> {
        self.refuse(SERVICE, "MemberUpdate", r).await
    }
    async fn member_list(
        &self,
        r: Request<PbMemberListRequest>,
    ) -> Result<Response<PbMemberListResponse>, Status> {
        self.call(
            SERVICE,
            "MemberList",
            Admit::Handler,
            r,
            |_, _| async move {
                Ok(synthetic_member_list(
                    self.synthetic_header(),
                    self.inner.advertise_client_urls.clone(),
                ))
            },
        )
        .await
    }
    async fn member_promote(
        &self,
        r: Request<PbMemberPromoteRequest>,
    ) -> Result<Response<PbMemberPromoteResponse>, Status> {
        self.refuse(SERVICE, "MemberPromote", r).await
    }
}
