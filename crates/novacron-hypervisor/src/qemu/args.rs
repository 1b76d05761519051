//! The QEMU command line for a VM. Pure: paths and spec in, arguments out.

use std::path::{Path, PathBuf};

use crate::RuntimeSpec;
use crate::accel::Accel;

/// Where a VM's files live on the host: `<vms>/<id>/`.
#[derive(Clone, Debug)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    pub fn new(vms_root: &Path, id: novacron_types::VmId) -> Self {
        Self {
            dir: vms_root.join(id.to_string()),
        }
    }
    pub fn root_disk(&self) -> PathBuf {
        self.dir.join("root.qcow2")
    }
    pub fn extra_disk(&self, n: usize) -> PathBuf {
        self.dir.join(format!("disk{n}.qcow2"))
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// QEMU's own stderr: why it failed to start or died.
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
    /// Every disk of the VM, boot disk first.
    pub fn disks(&self, extra: usize) -> Vec<PathBuf> {
        let mut d = vec![self.root_disk()];
        d.extend((1..=extra).map(|n| self.extra_disk(n)));
        d
    }
}

/// QEMU's option syntax separates with `,`; a literal comma in a value is written `,,`.
fn esc(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// The arguments (without the binary) that run `spec` with files under `paths`.
pub fn command_line(spec: &RuntimeSpec, paths: &VmPaths, accel: Accel) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&[
        "-name",
        &format!("{},process=novacron-{}", spec.name, spec.id),
    ]);
    // `uuid` ties the process to the VM: re-adoption checks it in /proc/PID/cmdline.
    push(&["-uuid", &spec.id.to_string()]);
    push(&["-machine", "q35", "-accel", accel.as_str()]);
    if accel == Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    push(&[
        "-smp",
        &spec.vcpus.to_string(),
        "-m",
        &spec.memory_mib.to_string(),
    ]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-vga",
        "none",
        "-nic",
        "none",
    ]);
    push(&[
        "-chardev",
        &format!(
            "file,id=serial0,path={},append=on",
            esc(&paths.console_log())
        ),
    ]);
    push(&["-serial", "chardev:serial0"]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", esc(&paths.qmp_socket())),
    ]);
    push(&["-pidfile", &paths.pidfile().display().to_string()]);
    for (i, disk) in paths.disks(spec.extra_disks_mib.len()).iter().enumerate() {
        let id = if i == 0 {
            "root".to_string()
        } else {
            format!("disk{i}")
        };
        push(&[
            "-blockdev",
            &format!(
                "driver=qcow2,node-name={id},file.driver=file,file.filename={},cache.direct=off",
                esc(disk)
            ),
        ]);
        let boot = if i == 0 && spec.boot.is_none() {
            ",bootindex=0"
        } else {
            ""
        };
        push(&[
            "-device",
            &format!("virtio-blk-pci,drive={id},id={id}-dev{boot}"),
        ]);
    }
    // Hot-plug slots: a q35 root bus takes no hot-plugged devices, root ports do.
    for slot in 1..=crate::VOLUME_SLOTS {
        push(&[
            "-device",
            &format!(
                "pcie-root-port,id=hp{slot},chassis={slot},bus=pcie.0,addr={:#x}",
                0x10 + slot
            ),
        ]);
    }
    for (i, v) in spec.volumes.iter().enumerate() {
        let node = crate::AttachedVolume::node_name(v.id);
        push(&[
            "-blockdev",
            &format!(
                "driver={},node-name={node},file.driver=file,file.filename={},cache.direct=off",
                v.format.as_str(),
                esc(&v.path)
            ),
        ]);
        push(&[
            "-device",
            &format!(
                "virtio-blk-pci,drive={node},id={},bus=hp{}",
                crate::AttachedVolume::device_id(v.id),
                i + 1
            ),
        ]);
    }
    if let Some(boot) = &spec.boot {
        push(&["-kernel", &boot.kernel]);
        if let Some(initrd) = &boot.initrd {
            push(&["-initrd", initrd]);
        }
        if let Some(cmdline) = &boot.cmdline {
            push(&["-append", cmdline]);
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use novacron_types::{ImageFormat, KernelBoot, VmId};

    #[test]
    fn command_line_names_every_disk_and_boots_the_kernel() {
        let spec = RuntimeSpec {
            id: VmId::new_random(),
            name: "web".into(),
            vcpus: 2,
            memory_mib: 256,
            base_image: "/img/base.qcow2".into(),
            base_format: ImageFormat::Qcow2,
            extra_disks_mib: vec![10],
            boot: Some(KernelBoot {
                kernel: "/img/vmlinuz".into(),
                initrd: Some("/img/initrd".into()),
                cmdline: Some("console=ttyS0".into()),
            }),
            disk_dirs: Vec::new(),
            root_size: None,
            shared_disks: false,
            volumes: vec![crate::AttachedVolume {
                id: novacron_types::VolumeId::new_random(),
                path: "/pool/v.raw".into(),
                format: novacron_types::VolumeFormat::Raw,
            }],
        };
        let paths = VmPaths::new(Path::new("/data/vms"), spec.id);
        let args = command_line(&spec, &paths, Accel::Tcg).join(" ");
        let dir = format!("/data/vms/{}", spec.id);
        for want in [
            format!("-uuid {}", spec.id),
            "-accel tcg".to_string(),
            "-smp 2 -m 256".to_string(),
            format!("file.filename={dir}/root.qcow2"),
            format!("file.filename={dir}/disk1.qcow2"),
            format!("-qmp unix:{dir}/qmp.sock,server=on,wait=off"),
            "-kernel /img/vmlinuz -initrd /img/initrd -append console=ttyS0".to_string(),
            "pcie-root-port,id=hp8,chassis=8".to_string(),
            format!(
                "driver=raw,node-name=v{},file.driver=file,file.filename=/pool/v.raw",
                spec.volumes[0].id.short()
            ),
            format!("id=vol-{}-dev,bus=hp1", spec.volumes[0].id),
        ] {
            assert!(args.contains(&want), "missing {want:?} in {args}");
        }
        assert!(
            !args.contains("-cpu host"),
            "TCG must not ask for the host CPU"
        );
        assert!(
            !args.contains("bootindex"),
            "kernel boot sets no disk boot index"
        );
    }
}
