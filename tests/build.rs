//! Builds the WebAssembly test guests from tests/guests: each C file with
//! clang for wasm32-wasi (Debian's wasi-libc), and each also as a WASI
//! preview2 component through wit-component and the preview1 adapter.

use std::path::PathBuf;
use std::process::Command;

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
        let status = Command::new("clang")
            .args(["--target=wasm32-wasi", "-O2", "-Wall", "-o"])
            .arg(&module)
            .arg(&path)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run clang ({e}); install clang, lld, wasi-libc and libclang-rt-14-dev-wasm32 (tests/run.sh does)")
            });
        assert!(status.success(), "clang failed on {}", path.display());
        let bytes = std::fs::read(&module).unwrap();
        let component = wit_component::ComponentEncoder::default()
            .module(&bytes)
            .unwrap()
            .adapter(
                "wasi_snapshot_preview1",
                wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_COMMAND_ADAPTER,
            )
            .unwrap()
            .validate(true)
            .encode()
            .unwrap();
        std::fs::write(out.join(format!("{stem}.component.wasm")), component).unwrap();
    }
    println!("cargo:rustc-env=HUSK_TEST_GUESTS={}", out.display());
}
