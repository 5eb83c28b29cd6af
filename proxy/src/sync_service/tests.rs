//! The scheduler loop on a paused clock, with a runner that stalls each run until released.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::sync::Semaphore;

use super::*;

/// A runner that records the source of every run it starts and holds each run until a permit
/// is added.
struct StallingRunner {
    started: Mutex<Vec<PathBuf>>,
    finished: AtomicUsize,
    active: AtomicUsize,
    max_active: AtomicUsize,
    release: Semaphore,
}

#[async_trait]
impl JobRunner for StallingRunner {
    async fn run(&self, job: &JobSettings, _options: &RunOptions) -> Result<JobReport, String> {
        let SourceSettings::Directory { path } = &job.source else {
            return Err("the test jobs read directories".into());
        };
        self.started.lock().push(path.clone());
        let active = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_active.fetch_max(active, Ordering::SeqCst);
        let permit = self.release.acquire().await.map_err(|e| e.to_string())?;
        permit.forget();
        self.active.fetch_sub(1, Ordering::SeqCst);
        self.finished.fetch_add(1, Ordering::SeqCst);
        Ok(JobReport::unpublished(&job.name, "20260101T120000Z", 1))
    }
}

impl Default for StallingRunner {
    fn default() -> Self {
        Self {
            started: Mutex::default(),
            finished: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
            release: Semaphore::new(0),
        }
    }
}

impl StallingRunner {
    fn started(&self) -> Vec<PathBuf> {
        self.started.lock().clone()
    }
}

/// Held by every test here that runs a scheduler, so that they run one at a time. The
/// scheduler's log lines are asserted on through a subscriber set for one thread, and
/// `tracing` caches per log statement whether any subscriber wants it. A statement first
/// reached in another test while that subscriber was being installed could be cached as
/// unwanted and its lines lost (seen once in a CI run under load).
static SCHEDULER_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Returns a `[sync]` section with one job `a` reading `source`, run every `interval_secs`.
fn config(interval_secs: u64, source: &str) -> SyncConfig {
    let source = SourceSettings::Directory {
        path: PathBuf::from(source),
    };
    SyncConfig {
        path: PathBuf::from("gateway.toml"),
        jobs: vec![JobSettings::new("a", source, "/nonexistent/a")],
        interval: Duration::from_secs(interval_secs),
        jitter: Duration::ZERO,
        max_lag: Duration::from_secs(900),
    }
}

#[tokio::test(start_paused = true)]
async fn reload_keeps_run_in_progress() {
    let _serial = SCHEDULER_TESTS.lock().await;
    let runner = Arc::new(StallingRunner::default());
    let monitor = Arc::new(Monitor::default());
    let (control, scheduler) = scheduler(Some(config(3600, "/v1")), monitor, runner.clone());
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(async move { scheduler.start(shutdown).await });

    tokio::time::sleep(FIRST_RUN_DELAY + Duration::from_millis(100)).await;
    assert_eq!(runner.started(), [PathBuf::from("/v1")]);
    control.apply(Some(config(1, "/v2")));
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        runner.started().len(),
        1,
        "a second run started beside the first"
    );
    assert_eq!(
        runner.finished.load(Ordering::SeqCst),
        0,
        "the run was interrupted"
    );

    runner.release.add_permits(100);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = runner.started();
    assert!(started.len() >= 2, "no run after the reload: {started:?}");
    assert_eq!(started[0], PathBuf::from("/v1"));
    assert!(
        started[1..]
            .iter()
            .all(|path| path == &PathBuf::from("/v2")),
        "{started:?}"
    );
    assert_eq!(runner.max_active.load(Ordering::SeqCst), 1);

    stop.send(true).expect("the scheduler listens");
    task.await.expect("the scheduler stops");
}

#[tokio::test(start_paused = true)]
async fn removed_section_stops_runs() {
    let _serial = SCHEDULER_TESTS.lock().await;
    let runner = Arc::new(StallingRunner::default());
    runner.release.add_permits(1000);
    let monitor = Arc::new(Monitor::default());
    let (control, scheduler) = scheduler(Some(config(1, "/v1")), monitor.clone(), runner.clone());
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(async move { scheduler.start(shutdown).await });

    tokio::time::sleep(Duration::from_millis(3500)).await;
    let before = runner.started().len();
    assert!(before >= 2, "{before} runs in 3.5 s at a 1 s interval");
    control.apply(None);
    assert_eq!(monitor.health.sync_freshness(), None);
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(runner.started().len(), before);

    stop.send(true).expect("the scheduler listens");
    task.await.expect("the scheduler stops");
}

/// The start of the message that a reload removing the `[sync]` section logs.
const SECTION_REMOVED: &str = "no [sync] section any more";

/// A log writer that keeps every line written to it in memory.
#[derive(Clone, Default)]
struct CapturedLog(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLog {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLog {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock()).into_owned()
    }
}

#[tokio::test(start_paused = true)]
async fn section_removal_logged_only_after_section() {
    let _serial = SCHEDULER_TESTS.lock().await;
    let log = CapturedLog::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _logging = tracing::subscriber::set_default(subscriber);

    let runner = Arc::new(StallingRunner::default());
    runner.release.add_permits(1000);
    let monitor = Arc::new(Monitor::default());
    let (control, scheduler) = scheduler(None, monitor, runner);
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(async move { scheduler.start(shutdown).await });

    for _ in 0..2 {
        control.apply(None);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = log.text();
    assert!(
        !text.contains(SECTION_REMOVED),
        "logged with no section before: {text}"
    );

    control.apply(Some(config(3600, "/v1")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        log.text().contains("sync schedule updated"),
        "{}",
        log.text()
    );
    control.apply(None);
    tokio::time::sleep(Duration::from_millis(100)).await;
    control.apply(None);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let text = log.text();
    assert_eq!(text.matches(SECTION_REMOVED).count(), 1, "{text}");

    stop.send(true).expect("the scheduler listens");
    task.await.expect("the scheduler stops");
}

/// A runner whose first run panics; later runs succeed.
#[derive(Default)]
struct PanickingOnceRunner {
    runs: AtomicUsize,
}

#[async_trait]
impl JobRunner for PanickingOnceRunner {
    async fn run(&self, job: &JobSettings, _options: &RunOptions) -> Result<JobReport, String> {
        if self.runs.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("injected panic in the first run");
        }
        Ok(JobReport::unpublished(&job.name, "20260101T120000Z", 1))
    }
}

#[tokio::test(start_paused = true)]
async fn panicking_run_keeps_schedule() {
    let _serial = SCHEDULER_TESTS.lock().await;
    let runner = Arc::new(PanickingOnceRunner::default());
    let monitor = Arc::new(Monitor::default());
    let (_control, scheduler) = scheduler(Some(config(1, "/v1")), monitor, runner.clone());
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(async move { scheduler.start(shutdown).await });

    tokio::time::sleep(FIRST_RUN_DELAY + Duration::from_millis(3500)).await;
    let runs = runner.runs.load(Ordering::SeqCst);
    assert!(runs >= 3, "{runs} runs after the first one panicked");

    stop.send(true).expect("the scheduler listens");
    task.await.expect("the scheduler stops");
}
