//! Building monoio runtimes: io_uring when the kernel allows it, else the epoll (legacy) driver.

use std::future::Future;
use std::sync::OnceLock;

/// Which monoio I/O driver a thread runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Driver {
    /// io_uring when the kernel supports it (probed once per process), else epoll.
    #[default]
    Auto,
    /// io_uring only; building the runtime fails if the kernel refuses it.
    IoUring,
    /// The readiness-based epoll driver.
    Legacy,
}

impl Driver {
    /// Parses `auto`, `io_uring`/`uring`, `legacy`/`epoll`.
    pub fn parse(s: &str) -> Option<Driver> {
        match s {
            "auto" => Some(Driver::Auto),
            "io_uring" | "iouring" | "uring" => Some(Driver::IoUring),
            "legacy" | "epoll" => Some(Driver::Legacy),
            _ => None,
        }
    }

    /// The driver this choice resolves to on this machine: `"io_uring"` or `"epoll"`.
    pub fn resolved_name(self) -> &'static str {
        match self {
            Driver::Legacy => "epoll",
            Driver::IoUring => "io_uring",
            Driver::Auto if uring_available() => "io_uring",
            Driver::Auto => "epoll",
        }
    }
}

/// Whether io_uring can be used here (probed once; seccomp or old kernels may refuse it).
pub fn uring_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(monoio::utils::detect_uring)
}

/// Runs `fut` to completion on a new single-threaded monoio runtime (with timers) on this thread.
pub fn block_on<F: Future>(driver: Driver, fut: F) -> std::io::Result<F::Output> {
    let use_uring = match driver {
        Driver::Legacy => false,
        Driver::IoUring => true,
        Driver::Auto => uring_available(),
    };
    if use_uring {
        // COOP_TASKRUN: completions are handled at this thread's next kernel entry instead of
        // interrupting it with an IPI; SINGLE_ISSUER: only this thread submits (thread per core).
        // Kernels older than 6.0 refuse the flags: build a plain ring then.
        let mut tuned = io_uring::IoUring::builder();
        tuned.setup_coop_taskrun().setup_single_issuer();
        let built = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .with_entries(1024)
            .uring_builder(tuned)
            .build();
        let mut rt = match built {
            Ok(rt) => rt,
            Err(_) => {
                monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().enable_timer().with_entries(1024).build()?
            }
        };
        Ok(rt.block_on(fut))
    } else {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build()?;
        Ok(rt.block_on(fut))
    }
}
