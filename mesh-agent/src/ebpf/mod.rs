//! Loading, attaching and pinning the eBPF programs, and typed handles to their pinned maps.
//!
//! Pin layout under `--bpffs-root` (default `/sys/fs/bpf/sinew`):
//! - `maps/<name>`: every map (see `mesh_common::map_names`); `maps/abi` holds the layout record;
//! - `links/<program>`: one bpf_link per program: attached at `--cgroup-root`, or (the same-node acceleration's
//!   sk_msg and stream verdict programs) on the `sk_conns` map.
//!
//! Install is idempotent and never detaches: maps that are already pinned are reused (after the ABI check), and a
//! program whose link is already pinned is swapped in place with `BPF_LINK_UPDATE`. Only [`uninstall`] detaches,
//! and `--sockmap false` (the acceleration programs, see [`accel`]).

pub mod accel;
pub mod inspect;
pub mod policy;
pub mod reconcile;

use std::{
    fs,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use aya::{
    EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{CgroupAttachMode, CgroupSkbAttachType, Program, links::FdLink, links::PinnedLink},
};
use mesh_common::{
    ABI_HASH, ABI_VERSION, AbiRecord, Backend, RevNatKey, RevNatValue, ServiceCounters, ServiceKey,
    ServiceValue, SlotKey, SlotValue, map_names,
};
use tracing::{info, warn};

use crate::sys;

/// The eBPF object built by build.rs from mesh-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

/// Every program in the object: cgroup sock_addr programs (attach type from their section), the cgroup_skb
/// ingress policy program, and the sock_ops program of the redirect to the node proxy.
pub const PROGRAMS: [&str; 10] = [
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "recvmsg4",
    "recvmsg6",
    "getpeername4",
    "getpeername6",
    "policy_ingress",
    "proxy_sockops",
];

/// Where things are pinned.
#[derive(Clone, Debug)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }
    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }
    pub fn link(&self, program: &str) -> PathBuf {
        self.links_dir().join(program)
    }
    /// A directory whose presence asks the agent holding the lock to hand the node over.
    pub fn handover(&self) -> PathBuf {
        self.root.join("handover")
    }
}

/// Typed handles to the pinned maps. The reconciler is the only writer of services, slots and backends.
pub struct Maps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub slots: HashMap<MapData, SlotKey, SlotValue>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub rev_nat: HashMap<MapData, RevNatKey, RevNatValue>,
    pub counters: PerCpuArray<MapData, ServiceCounters>,
}

pub(crate) fn open_map(layout: &Layout, name: &str) -> anyhow::Result<Map> {
    let path = layout.map(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    Map::from_map_data(data).with_context(|| format!("map {}", path.display()))
}

impl Maps {
    /// Opens every map from its pin. Fails (naming the map) if one is missing or has another shape.
    pub fn open(layout: &Layout) -> anyhow::Result<Self> {
        let m = |name| open_map(layout, name);
        Ok(Self {
            services: HashMap::try_from(m(map_names::SERVICES)?)?,
            slots: HashMap::try_from(m(map_names::SLOTS)?)?,
            backends: HashMap::try_from(m(map_names::BACKENDS)?)?,
            rev_nat: HashMap::try_from(m(map_names::REV_NAT)?)?,
            counters: PerCpuArray::try_from(m(map_names::COUNTERS)?)?,
        })
    }
}

/// Reads the ABI record of an existing install, if there is one.
pub fn pinned_abi(layout: &Layout) -> anyhow::Result<Option<AbiRecord>> {
    if !layout.map(map_names::ABI).exists() {
        return Ok(None);
    }
    let abi: Array<MapData, AbiRecord> = Array::try_from(open_map(layout, map_names::ABI)?)?;
    let rec = abi.get(&0, 0)?;
    // A zeroed record means an install that stopped before its last step: nothing to adopt-check yet.
    Ok((rec.version != 0).then_some(rec))
}

/// Makes sure `root` is on a bpf filesystem, mounting one when needed, as Cilium's `bpf.autoMount` does: at
/// `/sys/fs/bpf` when the root lives there, otherwise at the root directory itself.
pub fn ensure_bpffs(root: &Path) -> anyhow::Result<()> {
    let sys_bpf = Path::new("/sys/fs/bpf");
    let mounted = |p: &Path| {
        sys::fs_magic(p)
            .map(|m| m == sys::BPF_FS_MAGIC)
            .unwrap_or(false)
    };
    // The nearest existing ancestor tells which filesystem the root would be created on.
    let existing = root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if mounted(existing) {
        return Ok(());
    }
    let target = if root.starts_with(sys_bpf) {
        sys_bpf
    } else {
        root
    };
    fs::create_dir_all(target).with_context(|| format!("creating {}", target.display()))?;
    sys::mount_bpffs(target).with_context(|| format!("mounting bpffs at {}", target.display()))?;
    info!(at = %target.display(), "mounted bpffs");
    Ok(())
}

fn check_cgroup2(cgroup_root: &Path) -> anyhow::Result<()> {
    let magic = sys::fs_magic(cgroup_root)
        .with_context(|| format!("--cgroup-root {}", cgroup_root.display()))?;
    if magic != sys::CGROUP2_SUPER_MAGIC {
        bail!(
            "--cgroup-root {} is not a cgroup v2 directory",
            cgroup_root.display()
        );
    }
    Ok(())
}

/// Holds the install's lock for as long as it lives: one agent per `--bpffs-root`, so two reconcilers never fight
/// over the same maps.
pub struct RootLock {
    _dir: fs::File,
}

/// Locks the bpffs root (creating and mounting it if needed). `Ok(None)` while another agent holds it.
pub fn try_lock_root(layout: &Layout) -> anyhow::Result<Option<RootLock>> {
    ensure_bpffs(&layout.root)?;
    fs::create_dir_all(&layout.root)
        .with_context(|| format!("creating {}", layout.root.display()))?;
    let dir = fs::File::open(&layout.root)
        .with_context(|| format!("opening {}", layout.root.display()))?;
    let locked = sys::try_lock_exclusive(&dir)
        .with_context(|| format!("locking {}", layout.root.display()))?;
    Ok(locked.then_some(RootLock { _dir: dir }))
}

/// Asks the agent that holds the lock to hand over (a rolling update's new agent does this). bpffs holds
/// directories but no regular files, so the request is an empty directory.
pub fn request_handover(layout: &Layout) -> anyhow::Result<()> {
    match fs::create_dir(layout.handover()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e).with_context(|| format!("creating {}", layout.handover().display())),
    }
}

/// Whether another agent asked for this node.
pub fn handover_requested(layout: &Layout) -> bool {
    layout.handover().is_dir()
}

/// Removes the request once the lock is taken (by its asker, or by a later agent if the asker went away).
pub fn clear_handover(layout: &Layout) {
    let _ = fs::remove_dir(layout.handover());
}

/// What [`install`] did for each program.
#[derive(Debug, Default)]
pub struct InstallReport {
    /// Programs newly attached (first install, or a link that had gone missing).
    pub attached: Vec<String>,
    /// Programs swapped into an existing pinned link.
    pub replaced: Vec<String>,
    /// Programs detached because the config no longer asks for them (`--sockmap false`).
    pub detached: Vec<String>,
    /// Whether the maps already existed (restart/upgrade) rather than being created.
    pub adopted_maps: bool,
}

/// Loads the object, reuses or creates the pinned maps, runs `prepare`, and attaches (or swaps in) every program.
///
/// `prepare` runs once the maps are pinned and before any program is attached, so a first install can fill the
/// maps (policy above all) before the first connection is judged: no start-up window without policy.
pub fn install<T>(
    layout: &Layout,
    cgroup_root: &Path,
    sockmap: accel::SockmapSettings,
    prepare: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<(InstallReport, T)> {
    check_cgroup2(cgroup_root)?;
    ensure_bpffs(&layout.root)?;
    fs::create_dir_all(layout.maps_dir())
        .with_context(|| format!("creating {}", layout.maps_dir().display()))?;
    fs::create_dir_all(layout.links_dir())
        .with_context(|| format!("creating {}", layout.links_dir().display()))?;

    let mut report = InstallReport::default();
    match pinned_abi(layout)? {
        Some(rec) if rec.version == ABI_VERSION && rec.layout_hash == ABI_HASH => {
            report.adopted_maps = true;
        }
        Some(rec) => bail!(
            "pinned maps under {} have ABI {}/{:#x}, this agent speaks {}/{:#x}; \
             run `mesh-agent uninstall` (migration between ABIs is not implemented yet)",
            layout.root.display(),
            rec.version,
            rec.layout_hash,
            ABI_VERSION,
            ABI_HASH
        ),
        None => {}
    }

    let map_paths: Vec<(&str, PathBuf)> =
        map_names::ALL.iter().map(|n| (*n, layout.map(n))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(OBJECT).context("loading the eBPF object")?;
    let prepared = prepare()?;

    let cgroup = fs::File::open(cgroup_root)
        .with_context(|| format!("opening --cgroup-root {}", cgroup_root.display()))?;
    for name in PROGRAMS {
        link_program(&mut ebpf, layout, name, &mut report, |p| {
            attach_cgroup(p, &cgroup)
        })?;
    }

    install_accel(&mut ebpf, layout, &cgroup, sockmap, &mut report)?;

    // Written last: an install that failed half-way has no ABI record yet and is simply retried.
    let mut abi: Array<MapData, AbiRecord> = Array::try_from(
        ebpf.take_map(map_names::ABI)
            .context("map abi missing from the object")?,
    )?;
    abi.set(
        0,
        AbiRecord {
            version: ABI_VERSION,
            layout_hash: ABI_HASH,
        },
        0,
    )?;
    // Dropping `ebpf` closes our fds; the pins keep the maps and the links (and so the programs) alive.
    Ok((report, prepared))
}

/// A link just created, still to be pinned: cgroup links come from aya, sockmap links from our own syscall.
enum NewLink {
    Aya(FdLink),
    Raw(OwnedFd),
}

/// Loads program `name` and puts it behind its pinned link: swapped into the link in place when one is pinned
/// already (the attachment never goes away), otherwise attached by `attach` and pinned.
fn link_program(
    ebpf: &mut aya::Ebpf,
    layout: &Layout,
    name: &str,
    report: &mut InstallReport,
    attach: impl FnOnce(&mut Program) -> anyhow::Result<NewLink>,
) -> anyhow::Result<()> {
    let program = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the object"))?;
    match program {
        Program::CgroupSockAddr(p) => p.load(),
        Program::CgroupSkb(p) => p.load(),
        Program::SockOps(p) => p.load(),
        Program::SkMsg(p) => p.load(),
        Program::SkSkb(p) => p.load(),
        _ => bail!("program {name} has an unexpected type"),
    }
    .with_context(|| format!("loading program {name}"))?;
    let pin = layout.link(name);
    if pin.exists() {
        replace(&pin, program.fd()?)?;
        report.replaced.push(name.to_string());
        return Ok(());
    }
    let pinned = match attach(program).with_context(|| format!("attaching {name}"))? {
        NewLink::Aya(link) => link.pin(&pin).map(drop).map_err(anyhow::Error::from),
        NewLink::Raw(fd) => sys::obj_pin(&fd, &pin).map_err(anyhow::Error::from),
    };
    pinned.with_context(|| format!("pinning link {}", pin.display()))?;
    report.attached.push(name.to_string());
    Ok(())
}

/// Attaches a cgroup program at `cgroup` through a bpf_link.
fn attach_cgroup(program: &mut Program, cgroup: &fs::File) -> anyhow::Result<NewLink> {
    // With bpf_link the kernel always uses multi-attach semantics (other tools' programs at the same cgroup keep
    // running) and rejects any flag, so the mode must be the flag-less `Single`.
    let mode = CgroupAttachMode::Single;
    let link = match program {
        Program::CgroupSockAddr(p) => {
            let id = p.attach(cgroup, mode)?;
            FdLink::try_from(p.take_link(id)?)?
        }
        Program::CgroupSkb(p) => {
            let id = p.attach(cgroup, CgroupSkbAttachType::Ingress, mode)?;
            FdLink::try_from(p.take_link(id)?)?
        }
        Program::SockOps(p) => {
            let id = p.attach(cgroup, mode)?;
            FdLink::try_from(p.take_link(id)?)?
        }
        _ => bail!("not a cgroup program"),
    };
    Ok(NewLink::Aya(link))
}

/// Attaches (or swaps in, or takes away) the same-node acceleration programs, see [`accel`].
fn install_accel(
    ebpf: &mut aya::Ebpf,
    layout: &Layout,
    cgroup: &fs::File,
    sockmap: accel::SockmapSettings,
    report: &mut InstallReport,
) -> anyhow::Result<()> {
    let sockets = accel::AccelMaps::open(layout)?.sockets();
    let sk_conns = match ebpf.map(map_names::SK_CONNS) {
        Some(Map::SockHash(m)) => m.fd().as_fd().try_clone_to_owned()?,
        _ => bail!("map {} missing from the object", map_names::SK_CONNS),
    };
    // The map programs first: a socket takes the map's programs when it is added (see `accel::MAP_PROGRAMS`).
    for (name, attach_type) in accel::MAP_PROGRAMS {
        let pin = layout.link(name);
        let wanted = sockmap.enabled && (name != "accel_verdict" || sockmap.stream_verdict);
        // Off, a program stays on the map while sockets that took it are still in the map (see `accel`).
        let keep = pin.exists() && sockets > 0;
        if !wanted && !keep {
            if pin.exists() {
                unpin_link(&pin)?;
                report.detached.push(name.to_string());
            }
            continue;
        }
        link_program(ebpf, layout, name, report, |p| {
            let link = sys::sockmap_link_create(p.fd()?, &sk_conns, attach_type)
                .with_context(|| format!("on map {} (Linux 6.10+)", map_names::SK_CONNS))?;
            Ok(NewLink::Raw(link))
        })?;
    }
    if sockmap.enabled {
        link_program(ebpf, layout, accel::SOCKOPS, report, |p| {
            attach_cgroup(p, cgroup)
        })?;
    } else if layout.link(accel::SOCKOPS).exists() {
        unpin_link(&layout.link(accel::SOCKOPS))?;
        report.detached.push(accel::SOCKOPS.to_string());
    }
    Ok(())
}

/// Unpins a link, which drops its last reference and detaches its program.
fn unpin_link(pin: &Path) -> anyhow::Result<()> {
    PinnedLink::from_pin(pin)
        .with_context(|| format!("opening pinned link {}", pin.display()))?
        .unpin()
        .with_context(|| format!("unpinning {}", pin.display()))?;
    Ok(())
}

/// Swaps `prog` into the pinned link at `pin`: the attachment never goes away, so no connection is ever judged
/// without a program.
fn replace(pin: &Path, prog: impl std::os::fd::AsFd) -> anyhow::Result<()> {
    let link =
        sys::obj_get(pin).with_context(|| format!("opening pinned link {}", pin.display()))?;
    sys::link_update(&link, prog)
        .with_context(|| format!("replacing the program of link {}", pin.display()))
}

/// Detaches every program and unpins everything under the layout. Idempotent; reports what it removed.
pub fn uninstall(layout: &Layout) -> anyhow::Result<Vec<String>> {
    let mut removed = Vec::new();
    // Every link pinned in our links directory, not only today's programs: an older agent may have pinned one
    // this version no longer has, and it would stay attached.
    // The sock_ops program that fills `sk_conns` goes first, the ones on the map after it.
    let mut pins: Vec<PathBuf> = [accel::SOCKOPS]
        .iter()
        .chain(PROGRAMS.iter())
        .chain(accel::PROGRAMS.iter())
        .map(|name| layout.link(name))
        .collect();
    pins.dedup();
    if let Ok(dir) = fs::read_dir(layout.links_dir()) {
        for entry in dir.flatten() {
            if !pins.contains(&entry.path()) {
                pins.push(entry.path());
            }
        }
    }
    for pin in pins {
        if !pin.exists() {
            continue;
        }
        match PinnedLink::from_pin(&pin) {
            // Unpinning drops the last reference to the link, which detaches the program.
            Ok(link) => {
                link.unpin()
                    .with_context(|| format!("unpinning {}", pin.display()))?;
            }
            Err(e) => {
                warn!(pin = %pin.display(), error = %e, "not a link; removing the pin anyway");
                fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
            }
        }
        removed.push(pin.display().to_string());
    }
    for name in map_names::ALL {
        let pin = layout.map(name);
        if pin.exists() {
            fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
            removed.push(pin.display().to_string());
        }
    }
    for dir in [layout.links_dir(), layout.maps_dir(), layout.handover()] {
        // Only empty directories go: anything else under the root is not ours to delete.
        let _ = fs::remove_dir(&dir);
    }
    // A root that is its own bpffs mount (ensure_bpffs mounted it there) is unmounted once it is empty.
    let is_bpf = |p: &Path| {
        sys::fs_magic(p)
            .map(|m| m == sys::BPF_FS_MAGIC)
            .unwrap_or(false)
    };
    let own_mount = is_bpf(&layout.root) && layout.root.parent().is_none_or(|p| !is_bpf(p));
    // A fresh bpffs already holds the kernel's preloaded iterators (maps.debug, progs.debug): those don't count.
    let empty = fs::read_dir(&layout.root).is_ok_and(|d| {
        d.filter_map(Result::ok)
            .all(|e| matches!(e.file_name().to_str(), Some("maps.debug" | "progs.debug")))
    });
    if own_mount && empty {
        sys::umount(&layout.root)
            .with_context(|| format!("unmounting {}", layout.root.display()))?;
    }
    let _ = fs::remove_dir(&layout.root);
    Ok(removed)
}
