//! Which device the host link opens ([`doca::open_host_link_device`]):
//! the one `DNE_DOCA_DEVICE` names, by IB name or PCI address, else the
//! first; a name that matches nothing is an error, never another device.
//! Its own test binary, with one test: it sets environment variables.
#![cfg(not(feature = "sdk"))] // the emulated device list

use doca::{DEVICE_ENV, DEVICES_ENV, DocaError, open_host_link_device};

#[test]
fn the_host_link_device_is_the_one_named_or_the_first() {
    // SAFETY: the only test of this binary, and nothing else runs threads
    // that read the environment.
    unsafe { std::env::set_var(DEVICES_ENV, "mlx5_0,pci=0000:03:00.0;mlx5_1,pci=0000:03:00.1") };
    // SAFETY: as above.
    unsafe { std::env::remove_var(DEVICE_ENV) };
    assert_eq!(open_host_link_device().unwrap().info().name, "mlx5_0");
    // SAFETY: as above. Empty, as a packaged defaults file leaves it.
    unsafe { std::env::set_var(DEVICE_ENV, "") };
    assert_eq!(open_host_link_device().unwrap().info().name, "mlx5_0");
    for (want, got) in [("mlx5_1", "mlx5_1"), ("0000:03:00.1", "mlx5_1"), ("0000:03:00.0", "mlx5_0")] {
        // SAFETY: as above.
        unsafe { std::env::set_var(DEVICE_ENV, want) };
        assert_eq!(open_host_link_device().unwrap().info().name, got, "{want}");
    }
    // SAFETY: as above.
    unsafe { std::env::set_var(DEVICE_ENV, "mlx5_9") };
    assert_eq!(open_host_link_device().unwrap_err(), DocaError::NOT_FOUND);
}
