//! The group coordinator of Kafka's classic consumer protocol, and the
//! offsets its groups commit.
//!
//! ```text
//!  Empty --join--> Preparing --every member rejoined (or the rebalance
//!                     ^        timeout passed)--> Completing --leader's
//!                     |                               sync--> Stable
//!                     +-- a join, a leave, a member whose session expired
//! ```
//!
//! The broker only relays: members name the assignors they support (range,
//! round-robin, cooperative-sticky: whatever the clients send), the
//! coordinator picks one all of them support, the leader computes the
//! assignment and hands it over in its SyncGroup, and each member gets its
//! part. Membership lives in memory (clients rejoin after a restart, as
//! they do after any coordinator change); committed offsets are bida's: a
//! Kafka group is an offset-commit group on bida's topic, durable in the
//! `_groups` log (`Broker::commit_offset`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::heartbeat_response::HeartbeatResponse;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponsePartition, OffsetFetchResponseTopic,
};
use kafka_protocol::messages::{
    HeartbeatRequest, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse,
    OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse,
    ResponseKind, SyncGroupRequest, SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use tokio::sync::{oneshot, watch};

use super::handlers::kafka_code;
use super::{KafkaError, Shared};
use crate::sync::lock;

/// How long a rebalance waits after the last join before it completes,
/// so members starting together land in one generation.
const SETTLE: Duration = Duration::from_millis(100);
/// How often the sweeper looks at rebalances and sessions.
const SWEEP: Duration = Duration::from_millis(50);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Empty,
    Preparing,
    Completing,
    Stable,
}

struct Member {
    session_timeout: Duration,
    rebalance_timeout: Duration,
    protocols: Vec<(StrBytes, Bytes)>,
    last_seen: Instant,
    /// Joined in the rebalance under way.
    joined: bool,
    join: Option<oneshot::Sender<JoinGroupResponse>>,
    sync: Option<oneshot::Sender<SyncGroupResponse>>,
    assignment: Bytes,
}

struct Group {
    state: State,
    generation: i32,
    protocol_type: StrBytes,
    protocol: Option<StrBytes>,
    leader: Option<StrBytes>,
    members: BTreeMap<StrBytes, Member>,
    rebalance_deadline: Instant,
    last_join: Instant,
}

/// Every group's membership.
pub(crate) struct Coordinator {
    groups: Mutex<HashMap<String, Group>>,
    next_member: AtomicU64,
}

fn error_join(error: ResponseError, member_id: StrBytes) -> JoinGroupResponse {
    let mut r = JoinGroupResponse::default();
    r.error_code = error.code();
    r.generation_id = -1;
    r.member_id = member_id;
    r
}

fn error_sync(error: ResponseError) -> SyncGroupResponse {
    let mut r = SyncGroupResponse::default();
    r.error_code = error.code();
    r
}

impl Group {
    fn new(protocol_type: StrBytes) -> Self {
        let now = Instant::now();
        Group {
            state: State::Empty,
            generation: 0,
            protocol_type,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            rebalance_deadline: now,
            last_join: now,
        }
    }

    /// Starts a rebalance: every member must join again.
    fn prepare(&mut self, now: Instant) {
        if self.state != State::Preparing {
            self.state = State::Preparing;
            let timeout = self
                .members
                .values()
                .map(|m| m.rebalance_timeout)
                .max()
                .unwrap_or(Duration::from_secs(30));
            self.rebalance_deadline = now + timeout;
            for m in self.members.values_mut() {
                m.joined = false;
                if let Some(sync) = m.sync.take() {
                    let _ = sync.send(error_sync(ResponseError::RebalanceInProgress));
                }
            }
        }
    }

    /// Completes the rebalance if every member joined (and the joins have
    /// settled) or its time is up.
    fn try_complete(&mut self, now: Instant) {
        if self.state != State::Preparing {
            return;
        }
        let all_joined = self.members.values().all(|m| m.joined);
        let settled = now.duration_since(self.last_join) >= SETTLE;
        if !(all_joined && settled) && now < self.rebalance_deadline {
            return;
        }
        self.members.retain(|_, m| m.joined);
        if self.members.is_empty() {
            self.state = State::Empty;
            return;
        }
        // A protocol every member supports, in the leader's order.
        if self
            .leader
            .as_ref()
            .is_none_or(|l| !self.members.contains_key(l))
        {
            self.leader = self.members.keys().next().cloned();
        }
        let leader = self.leader.clone().unwrap_or_default();
        let protocol = self.members.get(&leader).and_then(|l| {
            l.protocols
                .iter()
                .map(|(name, _)| name.clone())
                .find(|name| {
                    self.members
                        .values()
                        .all(|m| m.protocols.iter().any(|(n, _)| n == name))
                })
        });
        let Some(protocol) = protocol else {
            for (id, m) in self.members.iter_mut() {
                if let Some(join) = m.join.take() {
                    let _ = join.send(error_join(
                        ResponseError::InconsistentGroupProtocol,
                        id.clone(),
                    ));
                }
            }
            self.members.clear();
            self.state = State::Empty;
            return;
        };
        self.generation += 1;
        self.protocol = Some(protocol.clone());
        self.state = State::Completing;
        let everyone: Vec<JoinGroupResponseMember> = self
            .members
            .iter()
            .map(|(id, m)| {
                let mut jm = JoinGroupResponseMember::default();
                jm.member_id = id.clone();
                jm.metadata = m
                    .protocols
                    .iter()
                    .find(|(n, _)| *n == protocol)
                    .map(|(_, meta)| meta.clone())
                    .unwrap_or_default();
                jm
            })
            .collect();
        for (id, m) in self.members.iter_mut() {
            m.assignment = Bytes::new();
            m.last_seen = now;
            if let Some(join) = m.join.take() {
                let mut r = JoinGroupResponse::default();
                r.generation_id = self.generation;
                r.protocol_type = Some(self.protocol_type.clone());
                r.protocol_name = Some(protocol.clone());
                r.leader = leader.clone();
                r.member_id = id.clone();
                if *id == leader {
                    r.members = everyone.clone();
                }
                let _ = join.send(r);
            }
        }
    }

    /// Drops members whose session ran out; a rebalance follows.
    fn expire(&mut self, now: Instant) {
        if self.state == State::Preparing {
            return;
        }
        let before = self.members.len();
        self.members
            .retain(|_, m| now.duration_since(m.last_seen) < m.session_timeout);
        if self.members.len() < before {
            if self.members.is_empty() {
                self.state = State::Empty;
            } else {
                self.prepare(now);
            }
        }
    }
}

impl Coordinator {
    pub(crate) fn new() -> Self {
        Coordinator {
            groups: Mutex::new(HashMap::new()),
            next_member: AtomicU64::new(0),
        }
    }

    fn sweep(&self) {
        let now = Instant::now();
        for g in lock(&self.groups).values_mut() {
            g.try_complete(now);
            g.expire(now);
        }
    }
}

/// Completes rebalances and expires sessions every 50 ms until `stop`.
pub(super) async fn run_sweeper(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SWEEP);
    loop {
        tokio::select! {
            _ = tick.tick() => shared.groups.sweep(),
            _ = stop.changed() => return,
        }
    }
}

pub(super) async fn join(
    shared: Arc<Shared>,
    req: JoinGroupRequest,
) -> Result<ResponseKind, KafkaError> {
    let group_id = req.group_id.0.to_string();
    let (tx, rx) = oneshot::channel();
    {
        let mut groups = lock(&shared.groups.groups);
        let now = Instant::now();
        if req.protocols.is_empty() || req.protocol_type.is_empty() {
            return Ok(ResponseKind::JoinGroup(error_join(
                ResponseError::InconsistentGroupProtocol,
                req.member_id,
            )));
        }
        let g = groups
            .entry(group_id.clone())
            .or_insert_with(|| Group::new(req.protocol_type.clone()));
        if g.members.is_empty() {
            g.protocol_type = req.protocol_type.clone();
        } else if g.protocol_type != req.protocol_type {
            return Ok(ResponseKind::JoinGroup(error_join(
                ResponseError::InconsistentGroupProtocol,
                req.member_id,
            )));
        }
        let member_id = if req.member_id.is_empty() {
            let n = shared.groups.next_member.fetch_add(1, Ordering::Relaxed);
            StrBytes::from_string(format!("{group_id}-member-{n}"))
        } else if g.members.contains_key(&req.member_id) {
            req.member_id.clone()
        } else {
            return Ok(ResponseKind::JoinGroup(error_join(
                ResponseError::UnknownMemberId,
                req.member_id,
            )));
        };
        let session = Duration::from_millis(req.session_timeout_ms.max(1000) as u64);
        let rebalance = if req.rebalance_timeout_ms > 0 {
            Duration::from_millis(req.rebalance_timeout_ms as u64)
        } else {
            session
        };
        let member = Member {
            session_timeout: session,
            rebalance_timeout: rebalance,
            protocols: req
                .protocols
                .iter()
                .map(|p| (p.name.clone(), p.metadata.clone()))
                .collect(),
            last_seen: now,
            joined: true,
            join: Some(tx),
            sync: None,
            assignment: Bytes::new(),
        };
        // Any join outside a rebalance starts one (a new member, or one
        // rejoining with a new subscription): everybody joins again.
        g.members.insert(member_id.clone(), member);
        if g.state != State::Preparing {
            g.prepare(now);
        }
        if let Some(m) = g.members.get_mut(&member_id) {
            m.joined = true;
        }
        g.last_join = now;
        g.try_complete(now);
    }
    let response = rx
        .await
        .unwrap_or_else(|_| error_join(ResponseError::RebalanceInProgress, StrBytes::default()));
    Ok(ResponseKind::JoinGroup(response))
}

pub(super) async fn sync(
    shared: Arc<Shared>,
    req: SyncGroupRequest,
) -> Result<ResponseKind, KafkaError> {
    let rx = {
        let mut groups = lock(&shared.groups.groups);
        let Some(g) = groups.get_mut(req.group_id.0.as_str()) else {
            return Ok(ResponseKind::SyncGroup(error_sync(
                ResponseError::UnknownMemberId,
            )));
        };
        if !g.members.contains_key(&req.member_id) {
            return Ok(ResponseKind::SyncGroup(error_sync(
                ResponseError::UnknownMemberId,
            )));
        }
        if req.generation_id != g.generation {
            return Ok(ResponseKind::SyncGroup(error_sync(
                ResponseError::IllegalGeneration,
            )));
        }
        let answer = |assignment: Bytes, g: &Group| {
            let mut r = SyncGroupResponse::default();
            r.protocol_type = Some(g.protocol_type.clone());
            r.protocol_name = g.protocol.clone();
            r.assignment = assignment;
            r
        };
        match g.state {
            State::Preparing | State::Empty => {
                return Ok(ResponseKind::SyncGroup(error_sync(
                    ResponseError::RebalanceInProgress,
                )))
            }
            State::Stable => {
                let assignment = g
                    .members
                    .get(&req.member_id)
                    .map(|m| m.assignment.clone())
                    .unwrap_or_default();
                return Ok(ResponseKind::SyncGroup(answer(assignment, g)));
            }
            State::Completing => {}
        }
        if g.leader.as_ref() == Some(&req.member_id) {
            for a in &req.assignments {
                if let Some(m) = g.members.get_mut(&a.member_id) {
                    m.assignment = a.assignment.clone();
                }
            }
            g.state = State::Stable;
            let mut waiting = Vec::new();
            for m in g.members.values_mut() {
                if let Some(s) = m.sync.take() {
                    waiting.push((s, m.assignment.clone()));
                }
            }
            for (s, assignment) in waiting {
                let _ = s.send(answer(assignment, g));
            }
            let mine = g
                .members
                .get(&req.member_id)
                .map(|m| m.assignment.clone())
                .unwrap_or_default();
            return Ok(ResponseKind::SyncGroup(answer(mine, g)));
        }
        let (tx, rx) = oneshot::channel();
        if let Some(m) = g.members.get_mut(&req.member_id) {
            m.sync = Some(tx);
            m.last_seen = Instant::now();
        }
        rx
    };
    let response = rx
        .await
        .unwrap_or_else(|_| error_sync(ResponseError::RebalanceInProgress));
    Ok(ResponseKind::SyncGroup(response))
}

pub(super) fn heartbeat(shared: &Shared, req: HeartbeatRequest) -> HeartbeatResponse {
    let mut r = HeartbeatResponse::default();
    let mut groups = lock(&shared.groups.groups);
    let code = match groups.get_mut(req.group_id.0.as_str()) {
        None => ResponseError::UnknownMemberId.code(),
        Some(g) => match g.members.get_mut(&req.member_id) {
            None => ResponseError::UnknownMemberId.code(),
            Some(m) => {
                m.last_seen = Instant::now();
                if g.state == State::Preparing {
                    ResponseError::RebalanceInProgress.code()
                } else if req.generation_id != g.generation {
                    ResponseError::IllegalGeneration.code()
                } else {
                    0
                }
            }
        },
    };
    r.error_code = code;
    r
}

pub(super) fn leave(shared: &Shared, req: LeaveGroupRequest) -> LeaveGroupResponse {
    let mut r = LeaveGroupResponse::default();
    let ids: Vec<StrBytes> = if req.members.is_empty() {
        vec![req.member_id.clone()]
    } else {
        req.members.iter().map(|m| m.member_id.clone()).collect()
    };
    let mut groups = lock(&shared.groups.groups);
    let Some(g) = groups.get_mut(req.group_id.0.as_str()) else {
        r.error_code = ResponseError::UnknownMemberId.code();
        return r;
    };
    for id in ids {
        let mut m = MemberResponse::default();
        m.member_id = id.clone();
        if g.members.remove(&id).is_none() {
            m.error_code = ResponseError::UnknownMemberId.code();
        }
        r.members.push(m);
    }
    let now = Instant::now();
    if g.members.is_empty() {
        g.state = State::Empty;
    } else {
        g.prepare(now);
    }
    if req.members.is_empty() {
        r.error_code = r.members.first().map_or(0, |m| m.error_code);
        r.members.clear();
    }
    r
}

pub(super) async fn commit(
    shared: Arc<Shared>,
    req: OffsetCommitRequest,
) -> Result<ResponseKind, KafkaError> {
    let group = req.group_id.0.to_string();
    // A member of a generation must be a member of the current one; a
    // commit outside any generation (-1) is a simple commit.
    let refused = if req.generation_id_or_member_epoch >= 0 {
        let groups = lock(&shared.groups.groups);
        match groups.get(&group) {
            None => Some(ResponseError::UnknownMemberId),
            Some(g) if !g.members.contains_key(&req.member_id) => {
                Some(ResponseError::UnknownMemberId)
            }
            Some(g) if g.generation != req.generation_id_or_member_epoch => {
                Some(ResponseError::IllegalGeneration)
            }
            // As Kafka's coordinator: a member of the current generation
            // may commit while the group prepares a rebalance (what it
            // consumed before it rejoins), not between join and sync.
            Some(g) if g.state == State::Completing => Some(ResponseError::RebalanceInProgress),
            Some(_) => None,
        }
    } else {
        None
    };
    let mut response = OffsetCommitResponse::default();
    for t in req.topics {
        let mut out = OffsetCommitResponseTopic::default();
        out.name = t.name.clone();
        for p in t.partitions {
            let mut r = OffsetCommitResponsePartition::default();
            r.partition_index = p.partition_index;
            r.error_code = match refused {
                Some(e) => e.code(),
                None => match (
                    u32::try_from(p.partition_index),
                    u64::try_from(p.committed_offset),
                ) {
                    (Ok(partition), Ok(offset)) => match shared
                        .broker
                        .commit_offset(t.name.0.as_str(), partition, &group, offset)
                        .await
                    {
                        Ok(()) => 0,
                        Err(e) => kafka_code(&e).code(),
                    },
                    _ => ResponseError::InvalidRequest.code(),
                },
            };
            out.partitions.push(r);
        }
        response.topics.push(out);
    }
    Ok(ResponseKind::OffsetCommit(response))
}

pub(super) fn fetch_offsets(shared: &Shared, req: OffsetFetchRequest) -> OffsetFetchResponse {
    let group = req.group_id.0.to_string();
    let wanted: Vec<(String, Vec<u32>)> = match req.topics {
        Some(topics) => topics
            .into_iter()
            .map(|t| {
                (
                    t.name.0.to_string(),
                    t.partition_indexes
                        .iter()
                        .filter_map(|&p| u32::try_from(p).ok())
                        .collect(),
                )
            })
            .collect(),
        // Every partition the group holds an offset of.
        None => {
            let mut by_topic: BTreeMap<String, Vec<u32>> = BTreeMap::new();
            for (topic, partition, _) in shared.broker.group_offsets(&group) {
                by_topic.entry(topic).or_default().push(partition);
            }
            by_topic.into_iter().collect()
        }
    };
    let mut response = OffsetFetchResponse::default();
    for (topic, partitions) in wanted {
        let mut out = OffsetFetchResponseTopic::default();
        out.name = TopicName(StrBytes::from_string(topic.clone()));
        for p in partitions {
            let mut r = OffsetFetchResponsePartition::default();
            r.partition_index = p as i32;
            r.committed_leader_epoch = -1;
            r.committed_offset = shared
                .broker
                .committed_offset(&topic, p, &group)
                .map_or(-1, |o| o as i64);
            out.partitions.push(r);
        }
        response.topics.push(out);
    }
    response
}
