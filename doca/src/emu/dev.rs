//! Emulated devices: a configurable set of named devices with PCI addresses
//! and the IP address their emulated RDMA listens on.
//!
//! The set comes from `DNE_EMU_DEVICES` when it is set, a `;`-separated list
//! of `name[,pci=<bdf>][,ip=<address>]`, for example
//! `mlx5_0,pci=0000:03:00.0,ip=10.0.0.1;mlx5_1,pci=0000:03:00.1`;
//! otherwise one device, `emu0` at `0000:00:00.0` on `127.0.0.1`.

use crate::DocaError;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Name of the environment variable that lists the emulated devices.
pub const DEVICES_ENV: &str = "DNE_EMU_DEVICES";

/// Description of one device, as listed by [`devices`](crate::devices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Interface name (`mlx5_0`).
    pub name: String,
    /// PCI address (`0000:03:00.0`).
    pub pci_addr: String,
    /// Address the emulated RDMA of this device listens on.
    pub ip: IpAddr,
}

impl DeviceInfo {
    /// A device description (for [`Device::open_emulated`]).
    pub fn new(name: &str, pci_addr: &str, ip: IpAddr) -> Self {
        Self { name: name.to_owned(), pci_addr: pci_addr.to_owned(), ip }
    }

    /// Opens the device.
    pub fn open(&self) -> Result<Device, DocaError> {
        Device::open_emulated(self.clone())
    }
}

fn parse_spec(spec: &str) -> Result<Vec<DeviceInfo>, DocaError> {
    let mut out = Vec::new();
    for (i, item) in spec.split(';').map(str::trim).filter(|s| !s.is_empty()).enumerate() {
        let mut parts = item.split(',').map(str::trim);
        let name = parts.next().filter(|n| !n.is_empty() && !n.contains('=')).ok_or(DocaError::BAD_CONFIG)?;
        let mut dev = DeviceInfo::new(name, &format!("0000:00:{i:02x}.0"), IpAddr::V4(Ipv4Addr::LOCALHOST));
        for kv in parts {
            match kv.split_once('=') {
                Some(("pci", v)) if !v.is_empty() => dev.pci_addr = v.to_owned(),
                Some(("ip", v)) => dev.ip = v.parse().map_err(|_| DocaError::BAD_CONFIG)?,
                _ => return Err(DocaError::BAD_CONFIG),
            }
        }
        out.push(dev);
    }
    if out.is_empty() {
        return Err(DocaError::BAD_CONFIG);
    }
    Ok(out)
}

/// The devices this process sees.
pub fn devices() -> Result<Vec<DeviceInfo>, DocaError> {
    match std::env::var(DEVICES_ENV) {
        Ok(spec) => parse_spec(&spec).inspect_err(|_| log::error!("{DEVICES_ENV}={spec:?} is not a device list")),
        Err(_) => Ok(vec![DeviceInfo::new("emu0", "0000:00:00.0", IpAddr::V4(Ipv4Addr::LOCALHOST))]),
    }
}

#[derive(Debug)]
pub(crate) struct DevInner {
    pub(crate) info: DeviceInfo,
    /// Unique per open in this process: mmaps record which opened devices
    /// were added to them.
    pub(crate) id: u64,
}

/// An open device (`doca_dev`). Cloning shares it; every object created on
/// it keeps it open.
#[derive(Clone, Debug)]
pub struct Device {
    pub(crate) inner: Arc<DevInner>,
}

static NEXT_DEV_ID: AtomicU64 = AtomicU64::new(1);

impl Device {
    /// Opens the device with this interface name.
    pub fn open_by_name(name: &str) -> Result<Device, DocaError> {
        devices()?.into_iter().find(|d| d.name == name).ok_or(DocaError::NOT_FOUND)?.open()
    }

    /// Opens the device at this PCI address.
    pub fn open_by_pci(pci_addr: &str) -> Result<Device, DocaError> {
        devices()?.into_iter().find(|d| d.pci_addr == pci_addr).ok_or(DocaError::NOT_FOUND)?.open()
    }

    /// Opens the first device.
    pub fn open_first() -> Result<Device, DocaError> {
        devices()?.into_iter().next().ok_or(DocaError::NOT_FOUND)?.open()
    }

    /// Opens the device whose address is `ip`: a listed one, or else an
    /// emulated device made up on that address (so a node's fabric device
    /// is found from the node's address alone, as the SDK backend finds
    /// the card whose interface has it).
    pub fn open_by_ip(ip: IpAddr) -> Result<Device, DocaError> {
        match devices()?.into_iter().find(|d| d.ip == ip) {
            Some(d) => d.open(),
            None => DeviceInfo::new("emu0", "0000:00:00.0", ip).open(),
        }
    }

    /// Opens a device described by the caller (emulated backend only).
    pub fn open_emulated(info: DeviceInfo) -> Result<Device, DocaError> {
        // Relaxed: a unique counter; no memory is published through it.
        let id = NEXT_DEV_ID.fetch_add(1, Ordering::Relaxed);
        Ok(Device { inner: Arc::new(DevInner { info, id }) })
    }

    /// The device's description.
    pub fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists_parse() {
        let d = parse_spec("mlx5_0,pci=0000:03:00.0,ip=10.0.0.1; mlx5_1").unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].pci_addr, "0000:03:00.0");
        assert_eq!(d[0].ip, "10.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(d[1].name, "mlx5_1");
        assert_eq!(d[1].ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
        for bad in ["", ";", "a,ip=nope", "a,color=red", "pci=1"] {
            assert_eq!(parse_spec(bad), Err(DocaError::BAD_CONFIG), "{bad}");
        }
        let a = DeviceInfo::new("x", "y", IpAddr::V4(Ipv4Addr::LOCALHOST)).open().unwrap();
        let b = a.info().open().unwrap();
        assert_ne!(a.id(), b.id());
        let c = Device::open_by_ip("10.9.8.7".parse().unwrap()).unwrap();
        assert_eq!(c.info().ip, "10.9.8.7".parse::<IpAddr>().unwrap());
    }
}
