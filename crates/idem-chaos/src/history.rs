//! The history of a run and the checker that judges it.
//!
//! Clients record every attempt and its answer; the upstream records every execution.
//! Both use one clock (microseconds since the run began, from one `Instant`), so the
//! checker can compare a second execution with the moment the first one's request was
//! sent: a claim happens after its request is sent, so a lease taken for the first
//! execution cannot have expired before `sent + lease`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Microseconds since the run began.
pub type Micros = u64;

/// One record's identity, as idem scopes it: (tenant, route, key).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OpKey {
    /// The caller's credential (the upstream sees it in `Authorization`).
    pub tenant: String,
    /// The request path (one route per path here).
    pub route: String,
    /// The idempotency key.
    pub key: String,
}

impl std::fmt::Display for OpKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "({}, {}, {})", self.tenant, self.route, self.key)
    }
}

/// What one attempt got.
#[derive(Clone, Debug)]
pub enum AttemptResult {
    /// An HTTP answer, read to the end.
    Answer {
        /// Status code.
        status: u16,
        /// `Idempotent-Replayed: true` was present.
        replayed: bool,
        /// The whole body as received (a replay must equal the first answer's).
        body: Bytes,
    },
    /// No answer.
    Transport(TransportKind),
}

/// Why an attempt got no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportKind {
    /// The connection was refused: the request never reached idem.
    Connect,
    /// The client stopped waiting (its own attempt timeout).
    Timeout,
    /// The connection broke after the request was sent, or the body broke off.
    Broken,
}

/// One attempt of one operation.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// The record it targets.
    pub op: OpKey,
    /// Unique per attempt; sent as `x-attempt-id`, seen by the upstream.
    pub attempt_id: String,
    /// Which `idem` instance it went to.
    pub instance: usize,
    /// Hash of the logical payload (the same on every retry of one operation).
    pub fingerprint: String,
    /// When it was sent.
    pub sent: Micros,
    /// When its answer (or error) arrived.
    pub done: Micros,
    /// What it got.
    pub result: AttemptResult,
    /// Sent by the final verification, not by the load.
    pub verification: bool,
}

/// What the upstream did with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecKind {
    /// Ran and answered with this status and body.
    Answered {
        /// Status.
        status: u16,
        /// Body.
        body: Bytes,
    },
    /// Ran, then closed the connection without answering.
    Reset,
    /// Refused with 503 before doing anything: not an execution.
    Refused,
}

/// One request as the upstream saw it.
#[derive(Clone, Debug)]
pub struct Execution {
    /// (credential, path, key) from the forwarded request.
    pub op: OpKey,
    /// `x-attempt-id` of the forwarded request.
    pub attempt_id: String,
    /// When the upstream began handling it.
    pub at: Micros,
    /// What it did.
    pub kind: ExecKind,
}

impl Execution {
    /// Whether the work was done (a 503 refusal does nothing).
    pub fn executed(&self) -> bool {
        self.kind != ExecKind::Refused
    }
}

/// The shared log of a run.
#[derive(Clone)]
pub struct History {
    epoch: Instant,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    executions: Arc<Mutex<Vec<Execution>>>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl History {
    /// An empty history whose clock starts now.
    pub fn new() -> Self {
        History {
            epoch: Instant::now(),
            attempts: Arc::default(),
            executions: Arc::default(),
        }
    }

    /// Now, on the run's clock.
    pub fn now(&self) -> Micros {
        self.epoch.elapsed().as_micros() as Micros
    }

    /// Records an attempt.
    pub fn attempt(&self, a: Attempt) {
        self.attempts.lock().unwrap().push(a);
    }

    /// Records an execution.
    pub fn execution(&self, e: Execution) {
        self.executions.lock().unwrap().push(e);
    }

    /// A copy of the attempts so far.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.attempts.lock().unwrap().clone()
    }

    /// A copy of the executions so far.
    pub fn executions(&self) -> Vec<Execution> {
        self.executions.lock().unwrap().clone()
    }
}

/// SHA-256 of a body, hex, for reports.
pub fn hash(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..8])
}

/// The upstream's answer body: who asked, for what, and which execution answered.
/// Parsing it back from an answer proves whose response a client received.
pub fn upstream_body(op: &OpKey, exec: u64, attempt_id: &str, status: u16) -> String {
    serde_json::json!({
        "tenant": op.tenant,
        "route": op.route,
        "key": op.key,
        "exec": exec,
        "attempt": attempt_id,
        "status": status,
    })
    .to_string()
}

/// The (tenant, route, key) an upstream body names, if the body is one.
pub fn parse_upstream_body(body: &[u8]) -> Option<OpKey> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(OpKey {
        tenant: v.get("tenant")?.as_str()?.to_owned(),
        route: v.get("route")?.as_str()?.to_owned(),
        key: v.get("key")?.as_str()?.to_owned(),
    })
}

/// Statuses idem does not store under the default `stripe` profile.
pub fn stored_status(status: u16) -> bool {
    !matches!(
        status,
        400 | 401 | 403 | 404 | 405 | 408 | 409 | 413 | 415 | 422 | 429 | 503
    )
}

/// What the checker found.
#[derive(Clone, Debug, Default)]
pub struct Findings {
    /// Operations (distinct records the load touched).
    pub records: usize,
    /// Attempts sent.
    pub attempts: usize,
    /// Executions at the upstream (refusals excluded).
    pub executions: usize,
    /// (1) Second executions of one record while the first one's lease may have lived.
    pub duplicates: Vec<String>,
    /// Second executions after the first one's lease had certainly expired: allowed
    /// (`on_abandoned = "reexecute"`, after a crash or a lost answer), counted.
    pub reexecutions_after_lease: usize,
    /// (2) Replays that differ from the first answer, or two different first answers.
    pub replay_mismatches: Vec<String>,
    /// (3) Answers carrying another tenant's (or route's, or key's) response.
    pub leaks: Vec<String>,
    /// (4) Records answered with a stored outcome that the final verification did not
    /// find replayable.
    pub lost: Vec<String>,
    /// Requests the upstream executed whose client got no answer because the connection
    /// broke (expected after SIGKILL; a defect after SIGTERM).
    pub unanswered_executed: Vec<String>,
}

impl Findings {
    /// No violation of (1)–(4).
    pub fn clean(&self) -> bool {
        self.duplicates.is_empty()
            && self.replay_mismatches.is_empty()
            && self.leaks.is_empty()
            && self.lost.is_empty()
    }
}

/// The attempts that got an answer, in the order the answers arrived: each with its
/// status, whether it was a replay, and its body.
fn answers_in_order(attempts: &[Attempt]) -> Vec<(&Attempt, &u16, &bool, &Bytes)> {
    let mut answers: Vec<_> = attempts
        .iter()
        .filter_map(|a| match &a.result {
            AttemptResult::Answer {
                status,
                replayed,
                body,
            } => Some((a, status, replayed, body)),
            AttemptResult::Transport(_) => None,
        })
        .collect();
    answers.sort_by_key(|(a, ..)| a.done);
    answers
}

/// The first stored answer each record's clients received (status, body), by record:
/// what every later replay must equal. A non-replay answer wins over a replay.
pub fn references(attempts: &[Attempt]) -> BTreeMap<OpKey, (u16, Bytes)> {
    let mut first: BTreeMap<OpKey, (u16, Bytes, bool)> = BTreeMap::new();
    for (a, status, replayed, body) in answers_in_order(attempts) {
        if !stored_status(*status) || parse_upstream_body(body).is_none() {
            continue;
        }
        match first.get(&a.op) {
            Some((_, _, was_replay)) if !*was_replay || *replayed => {}
            _ => {
                first.insert(a.op.clone(), (*status, body.clone(), *replayed));
            }
        }
    }
    first
        .into_iter()
        .map(|(k, (s, b, _))| (k, (s, b)))
        .collect()
}

/// Checks (1), (2) and (3) over a history; (4) needs the stores, see
/// [`Findings::lost`], filled by the run's verification.
pub fn check(attempts: &[Attempt], executions: &[Execution], lease: Duration) -> Findings {
    let mut f = Findings {
        attempts: attempts.len(),
        executions: executions.iter().filter(|e| e.executed()).count(),
        ..Findings::default()
    };
    f.records = attempts
        .iter()
        .map(|a| &a.op)
        .collect::<std::collections::HashSet<_>>()
        .len();
    check_executions(attempts, executions, lease, &mut f);
    check_replays(attempts, &mut f);
    check_leaks(attempts, &mut f);
    check_unanswered(attempts, executions, &mut f);
    f
}

/// (1) Executions of one record: each one after the first must begin no earlier than
/// `sent + lease` of the one before it.
fn check_executions(
    attempts: &[Attempt],
    executions: &[Execution],
    lease: Duration,
    f: &mut Findings,
) {
    let lease = lease.as_micros() as Micros;
    let sent: HashMap<&str, &Attempt> = attempts
        .iter()
        .map(|a| (a.attempt_id.as_str(), a))
        .collect();
    let mut by_op: BTreeMap<&OpKey, Vec<&Execution>> = BTreeMap::new();
    for e in executions.iter().filter(|e| e.executed()) {
        by_op.entry(&e.op).or_default().push(e);
    }
    for (op, mut execs) in by_op {
        execs.sort_by_key(|e| e.at);
        for pair in execs.windows(2) {
            let (prev, next) = (pair[0], pair[1]);
            let Some(prev_attempt) = sent.get(prev.attempt_id.as_str()) else {
                f.duplicates.push(format!(
                    "{op}: execution of unknown attempt {} (cannot bound its lease)",
                    prev.attempt_id
                ));
                continue;
            };
            if next.at < prev_attempt.sent + lease {
                f.duplicates.push(format!(
                    "{op}: executed at {} ms (attempt {}) and again at {} ms (attempt {}), \
                     {} ms after the first request was sent, lease {} ms",
                    prev.at / 1000,
                    prev.attempt_id,
                    next.at / 1000,
                    next.attempt_id,
                    (next.at - prev_attempt.sent) / 1000,
                    lease / 1000
                ));
            } else {
                f.reexecutions_after_lease += 1;
            }
        }
    }
}

/// (2) Replays equal the first stored answer, byte for byte; never two first answers.
fn check_replays(attempts: &[Attempt], f: &mut Findings) {
    let refs = references(attempts);
    let mut firsts: HashMap<&OpKey, &Bytes> = HashMap::new();
    for (a, status, replayed, body) in answers_in_order(attempts) {
        if *replayed {
            if let Some(mismatch) = replay_mismatch(a, *status, body, refs.get(&a.op)) {
                f.replay_mismatches.push(mismatch);
            }
        } else if stored_status(*status)
            && parse_upstream_body(body).is_some()
            && let Some(prev) = firsts.insert(&a.op, body)
            && prev != body
        {
            f.replay_mismatches.push(format!(
                "{}: two first answers: {} then {}",
                a.op,
                String::from_utf8_lossy(prev),
                String::from_utf8_lossy(body)
            ));
        }
    }
}

/// How a replay differs from the record's first stored answer, if it does.
fn replay_mismatch(
    a: &Attempt,
    status: u16,
    body: &Bytes,
    reference: Option<&(u16, Bytes)>,
) -> Option<String> {
    match reference {
        Some((s, b)) if *s == status && b == body => None,
        Some((s, b)) => Some(format!(
            "{}: replay {} {} differs from the first answer {} {}",
            a.op,
            status,
            String::from_utf8_lossy(body),
            s,
            String::from_utf8_lossy(b)
        )),
        None => Some(format!(
            "{}: replay {} {} of an outcome no client saw stored",
            a.op,
            status,
            String::from_utf8_lossy(body)
        )),
    }
}

/// (3) An upstream body names the record it was produced for.
fn check_leaks(attempts: &[Attempt], f: &mut Findings) {
    for a in attempts {
        if let AttemptResult::Answer { body, .. } = &a.result
            && let Some(owner) = parse_upstream_body(body)
            && owner != a.op
        {
            f.leaks.push(format!(
                "{} received the response of {owner} (attempt {})",
                a.op, a.attempt_id
            ));
        }
    }
}

/// Executed, but the answer never reached the client: the connection broke.
fn check_unanswered(attempts: &[Attempt], executions: &[Execution], f: &mut Findings) {
    let executed: std::collections::HashSet<&str> = executions
        .iter()
        .filter(|e| e.executed())
        .map(|e| e.attempt_id.as_str())
        .collect();
    for a in attempts {
        if matches!(a.result, AttemptResult::Transport(TransportKind::Broken))
            && executed.contains(a.attempt_id.as_str())
        {
            f.unanswered_executed.push(format!(
                "{}: attempt {} to instance {} executed, connection broke",
                a.op, a.attempt_id, a.instance
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(t: &str) -> OpKey {
        OpKey {
            tenant: t.into(),
            route: "/v1/charges".into(),
            key: "k1".into(),
        }
    }

    fn attempt(id: &str, o: &OpKey, sent: Micros, result: AttemptResult) -> Attempt {
        Attempt {
            op: o.clone(),
            attempt_id: id.into(),
            instance: 0,
            fingerprint: "f".into(),
            sent,
            done: sent + 10,
            result,
            verification: false,
        }
    }

    fn answer(status: u16, replayed: bool, body: &str) -> AttemptResult {
        AttemptResult::Answer {
            status,
            replayed,
            body: Bytes::from(body.to_owned()),
        }
    }

    fn exec(id: &str, o: &OpKey, at: Micros) -> Execution {
        Execution {
            op: o.clone(),
            attempt_id: id.into(),
            at,
            kind: ExecKind::Reset,
        }
    }

    const LEASE: Duration = Duration::from_secs(2);

    #[test]
    fn a_second_execution_inside_the_lease_is_a_duplicate() {
        let o = op("a");
        let attempts = vec![
            attempt("1", &o, 0, AttemptResult::Transport(TransportKind::Broken)),
            attempt("2", &o, 1_000_000, answer(409, false, "{}")),
        ];
        let inside = [exec("1", &o, 5_000), exec("2", &o, 1_999_999)];
        let f = check(&attempts, &inside, LEASE);
        assert_eq!(f.duplicates.len(), 1, "{f:?}");
        assert_eq!(f.unanswered_executed.len(), 1);
        let after = [exec("1", &o, 5_000), exec("2", &o, 2_000_000)];
        let f = check(&attempts, &after, LEASE);
        assert!(f.duplicates.is_empty(), "{f:?}");
        assert_eq!(f.reexecutions_after_lease, 1);
    }

    #[test]
    fn replays_must_equal_the_first_answer() {
        let o = op("a");
        let body = upstream_body(&o, 1, "1", 201);
        let other = upstream_body(&o, 2, "2", 201);
        let good = vec![
            attempt("1", &o, 0, answer(201, false, &body)),
            attempt("2", &o, 100, answer(201, true, &body)),
        ];
        assert!(check(&good, &[], LEASE).clean());
        let bad = vec![
            attempt("1", &o, 0, answer(201, false, &body)),
            attempt("2", &o, 100, answer(201, true, &other)),
            attempt("3", &o, 200, answer(500, true, &body)),
            attempt("4", &o, 300, answer(201, false, &other)),
        ];
        let f = check(&bad, &[], LEASE);
        assert_eq!(f.replay_mismatches.len(), 3, "{f:?}");
    }

    #[test]
    fn another_tenants_response_is_a_leak() {
        let (a, b) = (op("a"), op("b"));
        let attempts = vec![attempt(
            "1",
            &a,
            0,
            answer(201, false, &upstream_body(&b, 1, "x", 201)),
        )];
        let f = check(&attempts, &[], LEASE);
        assert_eq!(f.leaks.len(), 1);
        assert!(!f.clean());
    }

    #[test]
    fn refusals_are_not_executions_and_problems_are_not_answers() {
        let o = op("a");
        let attempts = vec![
            attempt(
                "1",
                &o,
                0,
                answer(503, false, &upstream_body(&o, 1, "1", 503)),
            ),
            attempt(
                "2",
                &o,
                10,
                answer(
                    409,
                    false,
                    r#"{"type":"urn:idem:problem:idempotency-key-in-use"}"#,
                ),
            ),
            attempt(
                "3",
                &o,
                20,
                answer(201, false, &upstream_body(&o, 2, "3", 201)),
            ),
        ];
        let execs = [
            Execution {
                kind: ExecKind::Refused,
                ..exec("1", &o, 5)
            },
            exec("3", &o, 25),
        ];
        let f = check(&attempts, &execs, LEASE);
        assert!(f.clean(), "{f:?}");
        assert_eq!(f.executions, 1);
        assert_eq!(references(&attempts)[&o].0, 201);
    }
}
