//! Ctrl-C and SIGTERM during training: the first asks the training loop to stop after the
//! current step (it writes a checkpoint and the process exits with 128 + the signal); a
//! second one exits at once. Checkpoints are renamed into place whole, so exiting at any
//! moment never leaves a damaged one.

use std::sync::atomic::{AtomicI32, Ordering};

/// The first stop signal received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// A handle on the stop signals, installed for the life of the process.
pub struct StopRequest(());

impl StopRequest {
    /// Installs the handlers for SIGINT and SIGTERM.
    pub fn install() -> StopRequest {
        #[cfg(unix)]
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: `on_signal` only touches an atomic and calls `_exit`, both
            // async-signal-safe; `sigaction` is given a fully initialised struct.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                libc::sigemptyset(&mut action.sa_mask);
                libc::sigaction(signal, &action, std::ptr::null_mut());
            }
        }
        StopRequest(())
    }

    /// The signal that asked to stop, if one has.
    pub fn signal(&self) -> Option<i32> {
        match RECEIVED.load(Ordering::SeqCst) {
            0 => None,
            signal => Some(signal),
        }
    }
}

#[cfg(unix)]
extern "C" fn on_signal(signal: libc::c_int) {
    if RECEIVED
        .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        // SAFETY: `_exit` is async-signal-safe; nothing is flushed or unwound.
        unsafe { libc::_exit(128 + signal) };
    }
}
