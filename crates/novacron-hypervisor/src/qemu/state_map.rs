//! Mapping QEMU's run states to NovaCron's observed VM states. Pure, and tested on its own.

use novacron_types::VmState;
use qapi::qmp::RunState;

/// What a `query-status` answer means for a VM whose QEMU process exists.
pub fn vm_state_from_run_state(status: RunState) -> VmState {
    match status {
        RunState::running => VmState::Running,
        // Paused by us (`stop`), or suspended by the guest (S3).
        RunState::paused | RunState::suspended => VmState::Paused,
        // QEMU is up but the guest has not started executing yet.
        RunState::prelaunch | RunState::inmigrate | RunState::restore_vm => VmState::Starting,
        // Migration and savevm hold the guest briefly; it is still alive.
        RunState::finish_migrate | RunState::save_vm | RunState::postmigrate | RunState::colo => {
            VmState::Paused
        }
        // The guest powered off (with -no-shutdown QEMU stays up).
        RunState::shutdown => VmState::Stopping,
        // The guest is halted but QEMU lives: it holds memory and disk locks and must still be
        // stopped, so it is not "crashed" (that means the process is gone). The reason says why.
        RunState::internal_error
        | RunState::io_error
        | RunState::guest_panicked
        | RunState::watchdog
        | RunState::debug => VmState::Paused,
    }
}

/// Why the guest is halted, for run states where QEMU stopped it on its own.
pub fn crash_reason(status: RunState) -> Option<&'static str> {
    match status {
        RunState::internal_error => Some("QEMU reported an internal error"),
        RunState::io_error => Some("the guest stopped on a disk I/O error"),
        RunState::guest_panicked => Some("the guest kernel panicked"),
        RunState::watchdog => Some("the guest's watchdog fired"),
        RunState::debug => Some("the guest is stopped in the debugger"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_run_state_maps_and_halts_have_reasons() {
        let all = [
            (RunState::debug, VmState::Paused),
            (RunState::inmigrate, VmState::Starting),
            (RunState::internal_error, VmState::Paused),
            (RunState::io_error, VmState::Paused),
            (RunState::paused, VmState::Paused),
            (RunState::postmigrate, VmState::Paused),
            (RunState::prelaunch, VmState::Starting),
            (RunState::finish_migrate, VmState::Paused),
            (RunState::restore_vm, VmState::Starting),
            (RunState::running, VmState::Running),
            (RunState::save_vm, VmState::Paused),
            (RunState::shutdown, VmState::Stopping),
            (RunState::suspended, VmState::Paused),
            (RunState::watchdog, VmState::Paused),
            (RunState::guest_panicked, VmState::Paused),
            (RunState::colo, VmState::Paused),
        ];
        let halted = [
            RunState::internal_error,
            RunState::io_error,
            RunState::guest_panicked,
            RunState::watchdog,
            RunState::debug,
        ];
        for (rs, want) in all {
            assert_eq!(vm_state_from_run_state(rs), want, "{rs:?}");
            assert_eq!(crash_reason(rs).is_some(), halted.contains(&rs), "{rs:?}");
            // A live QEMU is never reported as a state without a process.
            assert!(want.has_process(), "{rs:?} maps to {want:?}");
        }
    }
}
