//! Worker threads shared by many logs: their background work and the
//! flushes that durable waits need, so a log costs no thread of its own.
//!
//! ```text
//!   log ──wake(Background | Prefault | Flush)──> ready queue ──> worker threads
//!   log's next due time ─────────────────────> timer heap ───┘
//! ```
//!
//! A log registers itself ([`Workers::register`]) and is held weakly: a log
//! that is dropped simply stops being run. Each log has at most one job of
//! each kind queued, at most one background or prefault job running, and at
//! most [`FLUSHES_IN_FLIGHT`](super::FLUSHES_IN_FLIGHT) flush jobs running
//! (while one waits on an `fdatasync`, the next waiters' flush can start,
//! as group commit allows). A background job returns when it is next due;
//! an idle log is run once per retention check interval.
//!
//! One pool serves every partition of a broker, sized from the core count.
//! A log opened on its own starts a private pool (`Background::Threads`).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use super::background::FlushRound;
use super::flush::FLUSHES_IN_FLIGHT;
use crate::sync::lock;

/// Work a registered log can be asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Job {
    /// A pass of background work (`background.rs`).
    Background,
    /// Pages faulted in ahead of the writer.
    Prefault,
    /// The pending durable waits: one group commit for all of them.
    Flush,
}

/// What the pool runs: a log, seen through this trait.
pub(crate) trait Task: Send + Sync {
    /// Does `job` now; a flush joins the pool's `round`. A background job
    /// answers when it is next due.
    fn run(self: Arc<Self>, job: Job, round: &Mutex<FlushRound>) -> Option<Instant>;
}

/// A log's ticket with the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct TaskId(u64);

/// Threads that run the work of many logs (see the module docs).
pub struct Workers {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    name: String,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Signalled when the last running job of a closing log ends.
    idle: Condvar,
    next_id: AtomicU64,
    /// The flushes of many logs, made durable together (`background.rs`).
    round: Mutex<FlushRound>,
}

#[derive(Default)]
struct State {
    tasks: HashMap<TaskId, Entry>,
    ready: VecDeque<(TaskId, Job)>,
    timers: BinaryHeap<Reverse<(Instant, TaskId)>>,
    stopping: bool,
}

struct Entry {
    task: Weak<dyn Task>,
    /// Per job kind: queued, and how many run now.
    queued: [bool; 3],
    running: [u8; 3],
    /// Asked again while running: queue it once the run ends.
    again: [bool; 3],
    /// When the background job is next due (the timer heap may hold
    /// stale entries; this one counts).
    due: Option<Instant>,
    /// Being deregistered: nothing new starts; its running jobs finish.
    closing: bool,
}

impl Entry {
    fn running(&self) -> usize {
        self.running.iter().map(|&n| usize::from(n)).sum()
    }
}

std::thread_local! {
    /// The pool and log whose job this thread runs now, if any.
    static RUNNING: std::cell::Cell<Option<(usize, TaskId)>> = const { std::cell::Cell::new(None) };
}

fn slot(job: Job) -> usize {
    match job {
        Job::Background => 0,
        Job::Prefault => 1,
        Job::Flush => 2,
    }
}

fn concurrency(job: Job) -> u8 {
    match job {
        Job::Flush => FLUSHES_IN_FLIGHT as u8,
        Job::Background | Job::Prefault => 1,
    }
}

impl Workers {
    /// Starts `threads` workers named `<name>-<i>`.
    pub fn start(threads: usize, name: &str) -> io::Result<Arc<Workers>> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            idle: Condvar::new(),
            next_id: AtomicU64::new(0),
            round: Mutex::new(FlushRound::default()),
        });
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads.max(1) {
            let shared = Arc::clone(&shared);
            handles.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || worker(&shared))?,
            );
        }
        Ok(Arc::new(Workers {
            shared,
            threads: Mutex::new(handles),
            name: name.to_owned(),
        }))
    }

    /// Workers for a broker on this machine: two per core (at least four),
    /// since a flush holds its worker for an `fdatasync`.
    pub fn default_threads() -> usize {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        (2 * cores).max(4)
    }

    pub(crate) fn register(&self, task: Weak<dyn Task>) -> TaskId {
        let id = TaskId(self.shared.next_id.fetch_add(1, Ordering::Relaxed));
        lock(&self.shared.state).tasks.insert(
            id,
            Entry {
                task,
                queued: [false; 3],
                running: [0; 3],
                again: [false; 3],
                due: None,
                closing: false,
            },
        );
        self.wake(id, Job::Background);
        id
    }

    /// Forgets a log, once its running jobs have ended: after this
    /// returns, none runs (a shutdown's last checkpoint or a directory
    /// moved away cannot meet a background pass still writing). Called
    /// from a job of the same log (its last holder was the job), it waits
    /// for the others only.
    pub(crate) fn deregister(&self, id: TaskId) {
        let pool = Arc::as_ptr(&self.shared) as usize;
        let own = usize::from(RUNNING.with(|r| r.get()) == Some((pool, id)));
        let mut state = lock(&self.shared.state);
        let Some(entry) = state.tasks.get_mut(&id) else {
            return;
        };
        entry.closing = true;
        while state.tasks.get(&id).is_some_and(|e| e.running() > own) {
            state = self
                .shared
                .idle
                .wait(state)
                .unwrap_or_else(|p| p.into_inner());
        }
        state.tasks.remove(&id);
    }

    /// Asks for `job` of the log `id` to run soon.
    pub(crate) fn wake(&self, id: TaskId, job: Job) {
        let mut state = lock(&self.shared.state);
        if state.stopping {
            return;
        }
        let Some(entry) = state.tasks.get_mut(&id).filter(|e| !e.closing) else {
            return;
        };
        let s = slot(job);
        if entry.queued[s] {
            return;
        }
        if entry.running[s] >= concurrency(job) {
            entry.again[s] = true;
            return;
        }
        entry.queued[s] = true;
        state.ready.push_back((id, job));
        drop(state);
        self.shared.wake.notify_one();
    }

    /// Ends the threads once their running jobs end; queued ones are left.
    fn stop_threads(&self) {
        lock(&self.shared.state).stopping = true;
        self.shared.wake.notify_all();
        let threads: Vec<JoinHandle<()>> = lock(&self.threads).drain(..).collect();
        let me = std::thread::current().id();
        for t in threads {
            // The last holder can be a worker itself (a job held the log
            // that held the pool): it ends by itself once its job returns.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }

    /// Logs registered now.
    pub fn tasks(&self) -> usize {
        lock(&self.shared.state).tasks.len()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

impl fmt::Debug for Workers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workers")
            .field("name", &self.name)
            .field("threads", &lock(&self.threads).len())
            .finish()
    }
}

fn worker(shared: &Shared) {
    let mut state = lock(&shared.state);
    loop {
        if state.stopping {
            return;
        }
        let now = Instant::now();
        let st = &mut *state;
        // Due timers become ready background jobs.
        while let Some(&Reverse((at, id))) = st.timers.peek() {
            if at > now {
                break;
            }
            st.timers.pop();
            let Some(entry) = st.tasks.get_mut(&id).filter(|e| !e.closing) else {
                continue;
            };
            if entry.due != Some(at) {
                continue; // superseded by an earlier time
            }
            entry.due = None;
            let s = slot(Job::Background);
            if entry.queued[s] {
                continue;
            }
            if entry.running[s] > 0 {
                entry.again[s] = true;
            } else {
                entry.queued[s] = true;
                st.ready.push_back((id, Job::Background));
            }
        }
        let Some((id, job)) = st.ready.pop_front() else {
            let next = st.timers.peek().map(|Reverse((at, _))| *at);
            state = match next {
                Some(at) => {
                    let wait = at.saturating_duration_since(now);
                    shared
                        .wake
                        .wait_timeout(state, wait)
                        .map_or_else(|p| p.into_inner().0, |(g, _)| g)
                }
                None => shared.wake.wait(state).unwrap_or_else(|p| p.into_inner()),
            };
            continue;
        };
        let s = slot(job);
        let Some(entry) = st.tasks.get_mut(&id).filter(|e| !e.closing) else {
            continue;
        };
        entry.queued[s] = false;
        entry.running[s] += 1;
        let task = entry.task.upgrade();
        drop(state);
        let pool = shared as *const Shared as usize;
        RUNNING.with(|r| r.set(Some((pool, id))));
        let due = task.and_then(|t| t.run(job, &shared.round));
        RUNNING.with(|r| r.set(None));
        state = lock(&shared.state);
        let st = &mut *state;
        let Some(entry) = st.tasks.get_mut(&id) else {
            continue;
        };
        entry.running[s] -= 1;
        if entry.closing {
            shared.idle.notify_all();
            continue;
        }
        if std::mem::take(&mut entry.again[s]) && !entry.queued[s] {
            entry.queued[s] = true;
            st.ready.push_back((id, job));
            shared.wake.notify_one();
        }
        if let (Job::Background, Some(at)) = (job, due) {
            if entry.due.is_none_or(|current| at < current) {
                entry.due = Some(at);
                st.timers.push(Reverse((at, id)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    struct Counter {
        runs: [AtomicUsize; 3],
        /// A background job asks to run again this long after each run.
        every: Option<Duration>,
        flush_in: Mutex<usize>,
        flush_max_seen: AtomicUsize,
    }

    impl Task for Counter {
        fn run(self: Arc<Self>, job: Job, _round: &Mutex<FlushRound>) -> Option<Instant> {
            self.runs[slot(job)].fetch_add(1, Ordering::SeqCst);
            if job == Job::Flush {
                let now = {
                    let mut n = lock(&self.flush_in);
                    *n += 1;
                    *n
                };
                self.flush_max_seen.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
                *lock(&self.flush_in) -= 1;
            }
            self.every.map(|d| Instant::now() + d)
        }
    }

    fn counter(every: Option<Duration>) -> Arc<Counter> {
        Arc::new(Counter {
            runs: Default::default(),
            every,
            flush_in: Mutex::new(0),
            flush_max_seen: AtomicUsize::new(0),
        })
    }

    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn timers_run_background_jobs_and_a_dropped_task_stops() {
        let workers = Workers::start(2, "test-workers").unwrap();
        let task = counter(Some(Duration::from_millis(5)));
        let weak: Weak<dyn Task> = Arc::downgrade(&(Arc::clone(&task) as Arc<dyn Task>));
        let id = workers.register(weak);
        wait_until("ten timed runs", || {
            task.runs[0].load(Ordering::SeqCst) >= 10
        });
        workers.deregister(id);
        let after = task.runs[0].load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
        assert!(task.runs[0].load(Ordering::SeqCst) <= after + 1);
    }

    #[test]
    fn flush_jobs_run_at_most_two_at_once_and_wakes_during_a_run_are_kept() {
        let workers = Workers::start(4, "test-workers").unwrap();
        let task = counter(None);
        let weak: Weak<dyn Task> = Arc::downgrade(&(Arc::clone(&task) as Arc<dyn Task>));
        let id = workers.register(weak);
        for _ in 0..20 {
            workers.wake(id, Job::Flush);
            std::thread::sleep(Duration::from_millis(3));
        }
        wait_until("the last wake's flush", || {
            lock(&task.flush_in).eq(&0) && task.runs[2].load(Ordering::SeqCst) >= 2
        });
        std::thread::sleep(Duration::from_millis(60));
        let max = task.flush_max_seen.load(Ordering::SeqCst);
        assert!(
            (1..=FLUSHES_IN_FLIGHT).contains(&max),
            "{max} flushes at once"
        );
        assert!(
            task.runs[2].load(Ordering::SeqCst) < 20,
            "wakes while one was queued were merged"
        );
    }

    #[test]
    fn deregister_returns_only_once_the_running_job_has_ended() {
        let workers = Workers::start(2, "test-workers").unwrap();
        let task = counter(None);
        let weak: Weak<dyn Task> = Arc::downgrade(&(Arc::clone(&task) as Arc<dyn Task>));
        let id = workers.register(weak);
        workers.wake(id, Job::Flush); // a flush job sleeps 20 ms in run
        wait_until("the flush running", || lock(&task.flush_in).eq(&1));
        workers.deregister(id);
        assert_eq!(
            *lock(&task.flush_in),
            0,
            "deregister returned while its job ran"
        );
        let runs = task.runs[2].load(Ordering::SeqCst);
        workers.wake(id, Job::Flush);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            task.runs[2].load(Ordering::SeqCst),
            runs,
            "a forgotten log ran"
        );
        assert_eq!(workers.tasks(), 0);
    }
}
