//! `mxmoe info`: what the machine offers (driver, devices, limits), what the embedded PTX modules
//! and their SASS are, and which module each device loaded, why, and as SASS or PTX.

use anyhow::Context as _;
use mxmoe::device::{
    Gpu, PtxModule, cubin_arch, device_count, driver_present, embedded_cubin, embedded_ptx,
};

use crate::env::{driver_description, mib};

/// Options of `mxmoe info`.
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Also list every kernel of the loaded PTX module with its registers, static shared memory and
    /// local (spill) memory, as the driver reports them after loading.
    #[arg(long)]
    pub kernels: bool,
}

/// Prints the report. A machine without a driver or device is not an error.
pub fn run(args: &InfoArgs) -> anyhow::Result<()> {
    println!("mxmoe {}", env!("CARGO_PKG_VERSION"));
    for m in PtxModule::ALL {
        let text = embedded_ptx(m);
        println!(
            "embedded PTX ({} module): {} bytes, {}, {} kernels",
            m.name(),
            text.len(),
            ptx_target(text),
            m.entries().len()
        );
        match cubin_arch(m) {
            Some(arch) => println!(
                "embedded SASS ({} module): {} bytes, {arch}",
                m.name(),
                embedded_cubin(m).len()
            ),
            None => println!(
                "embedded SASS ({} module): none (built without SASS)",
                m.name()
            ),
        }
    }
    if !driver_present() {
        println!("no CUDA driver found");
        return Ok(());
    }
    println!("CUDA driver: {}", driver_description());
    let count = device_count().context("could not count CUDA devices")?;
    println!("devices: {count}");
    for ordinal in 0..count {
        let gpu =
            Gpu::open(ordinal).with_context(|| format!("could not open CUDA device {ordinal}"))?;
        print_device(ordinal, &gpu)?;
        if args.kernels {
            print_kernels(&gpu)?;
        }
    }
    Ok(())
}

/// The `.target` and `.version` lines of a PTX text, e.g. "target sm_90a, PTX ISA 8.0".
fn ptx_target(ptx: &str) -> String {
    let field = |directive: &str| {
        ptx.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(directive))
            .map(|rest| rest.trim().trim_end_matches(';').to_owned())
            .unwrap_or_else(|| "?".into())
    };
    format!("target {}, PTX ISA {}", field(".target"), field(".version"))
}

fn print_device(ordinal: usize, gpu: &Gpu) -> anyhow::Result<()> {
    let l = gpu.limits();
    let (free, total) = gpu
        .mem_info()
        .with_context(|| format!("could not read the memory of device {ordinal}"))?;
    println!("device {ordinal}: {}", l.name);
    println!(
        "  compute capability:        {}.{}",
        l.compute_capability.0, l.compute_capability.1
    );
    println!("  PTX module:                {}", gpu.module_selection());
    println!("  module code:               {}", gpu.module_code());
    if let Some(path) = gpu.ptx_override_path() {
        println!("  PTX override:              {}", path.display());
    }
    println!(
        "  PTX fingerprint:           {:016x}",
        gpu.ptx_fingerprint()
    );
    println!("  multiprocessors:           {}", l.sm_count);
    println!(
        "  shared memory per block:   {} bytes (opt-in maximum)",
        l.max_smem_per_block_optin
    );
    println!("  shared memory per SM:      {} bytes", l.max_smem_per_sm);
    println!("  registers per SM:          {}", l.regs_per_sm);
    println!("  L2 cache:                  {}", mib(l.l2_bytes));
    println!(
        "  memory:                    {} total, {} free",
        mib(total),
        mib(free)
    );
    Ok(())
}

fn print_kernels(gpu: &Gpu) -> anyhow::Result<()> {
    println!(
        "  {:<40} {:>5} {:>11} {:>11}",
        "kernel", "regs", "static smem", "local bytes"
    );
    for &name in gpu.module().entries() {
        let r = gpu
            .function_resources(name)
            .with_context(|| format!("could not read the attributes of kernel {name}"))?;
        println!(
            "  {name:<40} {:>5} {:>11} {:>11}",
            r.registers, r.static_smem_bytes, r.local_bytes
        );
    }
    Ok(())
}
