//! Builds the WebAssembly test guests from tests/guests: each C file with
//! clang for wasm32-wasi (Debian's wasi-libc), and each also as a WASI
//! preview2 component through wit-component and the preview1 adapter.
//! guests/net is a native preview2 guest: its C code calls wasi:sockets
//! through bindings that wit-bindgen-c generates here from guests/net/wit.

use std::path::{Path, PathBuf};
use std::process::Command;

fn clang(args: &[&str], inputs: &[&Path], output: &Path) {
    let status = Command::new("clang")
        .args(["--target=wasm32-wasi", "-O2", "-Wall"])
        .args(args)
        .arg("-o")
        .arg(output)
        .args(inputs)
        .status()
        .unwrap_or_else(|e| {
            panic!("cannot run clang ({e}); install clang, lld, wasi-libc and libclang-rt-14-dev-wasm32 (tests/run.sh does)")
        });
    assert!(status.success(), "clang failed on {inputs:?}");
}

fn encode(module: &Path, adapter: &[u8]) -> Vec<u8> {
    let bytes = std::fs::read(module).unwrap();
    wit_component::ComponentEncoder::default()
        .module(&bytes)
        .unwrap()
        .adapter("wasi_snapshot_preview1", adapter)
        .unwrap()
        .validate(true)
        .encode()
        .unwrap()
}

/// The netprobe guest: C bindings for its world, then a reactor module that
/// exports wasi:cli/run, then the component.
fn build_net(src: &Path, out: &Path) {
    let mut resolve = wit_parser::Resolve::default();
    let (pkg, _) = resolve.push_dir(src.join("wit")).unwrap();
    let world = resolve.select_world(&[pkg], Some("netprobe")).unwrap();
    let mut files = wit_bindgen_core::Files::default();
    wit_bindgen_c::Opts::default()
        .build()
        .generate(&mut resolve, world, &mut files)
        .unwrap();
    let gen = out.join("netprobe-bindings");
    std::fs::create_dir_all(&gen).unwrap();
    for (name, contents) in files.iter() {
        std::fs::write(gen.join(name), contents).unwrap();
    }
    let module = out.join("netprobe.core.wasm");
    let include = format!("-I{}", gen.display());
    clang(
        &["-mexec-model=reactor", &include],
        &[
            &src.join("netprobe.c"),
            &gen.join("netprobe.c"),
            &gen.join("netprobe_component_type.o"),
        ],
        &module,
    );
    let component = encode(
        &module,
        wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
    );
    std::fs::write(out.join("netprobe.component.wasm"), component).unwrap();
}

/// The freestanding VMM test guests, linked with lld into ELF files loaded
/// at 1 MiB: `.S` files are whole guests; `.c` files are compiled for i386
/// and assembled after `entry.inc` (the PVH note and entry) in .code32
/// mode, since the ELF must be 64-bit while the PVH entry is 32-bit.
fn build_vmm_guests(src: &Path, out: &Path) {
    for entry in std::fs::read_dir(src).unwrap() {
        let mut path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        match path.extension().and_then(|e| e.to_str()) {
            Some("S") => {}
            // pvh.inc and entry.inc are included, not built.
            Some("c") => {
                let asm = out.join(format!("{stem}.i386.s"));
                let status = Command::new("clang")
                    .args([
                        "--target=i386-unknown-none-elf",
                        "-ffreestanding",
                        "-fno-pic",
                        "-fno-builtin",
                        "-fno-stack-protector",
                        "-mno-sse",
                        "-mno-mmx",
                        "-O1",
                        "-Wall",
                        "-S",
                        "-o",
                    ])
                    .arg(&asm)
                    .arg(format!("-I{}", src.display()))
                    .arg(&path)
                    .status()
                    .expect("clang");
                assert!(status.success(), "clang failed on {}", path.display());
                let combined = out.join(format!("{stem}.S"));
                let text = std::fs::read_to_string(src.join("entry.inc")).unwrap()
                    + "\n        .code32\n"
                    + &std::fs::read_to_string(&asm).unwrap();
                std::fs::write(&combined, text).unwrap();
                path = combined;
            }
            _ => continue,
        }
        let elf = out.join(format!("{stem}.elf"));
        let status = Command::new("clang")
            .args([
                "--target=x86_64-unknown-none-elf",
                "-nostdlib",
                "-ffreestanding",
                "-fuse-ld=lld",
                "-static",
                "-Wl,-Ttext=0x100000",
                "-Wl,--build-id=none",
                "-Wl,-z,max-page-size=4096",
                "-o",
            ])
            .arg(&elf)
            .arg(format!("-I{}", src.display()))
            .arg(&path)
            .status()
            .expect("clang");
        assert!(status.success(), "clang failed on {}", path.display());
    }
}

/// Static Linux programs that tests copy into VM pods' containers (any
/// image runs them): each C file in guests/linux.
fn build_linux_programs(src: &Path, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "c") {
            continue;
        }
        let bin = out.join(path.file_stem().unwrap());
        let status = Command::new("clang")
            .args(["-static", "-O2", "-Wall", "-o"])
            .arg(&bin)
            .arg(&path)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run clang ({e}); install clang (tests/run.sh does)")
            });
        assert!(status.success(), "clang failed on {}", path.display());
    }
}

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("guests");
    std::fs::create_dir_all(&out).unwrap();
    let src = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("guests");
    println!("cargo:rerun-if-changed={}", src.display());
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "c") {
            continue;
        }
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        let module = out.join(format!("{stem}.wasm"));
        clang(&[], &[&path], &module);
        let component = encode(
            &module,
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER,
        );
        std::fs::write(out.join(format!("{stem}.component.wasm")), component).unwrap();
    }
    build_net(&src.join("net"), &out);
    build_vmm_guests(&src.join("vmm"), &out);
    build_linux_programs(&src.join("linux"), &out.join("linux"));
    println!("cargo:rustc-env=HUSK_TEST_GUESTS={}", out.display());
}
