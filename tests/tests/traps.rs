//! #22 item 8: a guest that traps, or that imports what the host does not
//! have, ended a foreground `husk run` with exit 134 and nothing printed.
//! The trap is now said on the container's stderr (its log).

mod common;

use common::*;

fn module(env: &Env, name: &str, wat: &str) -> String {
    let path = env.root().join(name);
    std::fs::write(&path, wat::parse_str(wat).unwrap()).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn a_trap_and_an_unknown_import_are_printed() {
    let env = Env::new();
    let trap = module(
        &env,
        "trap.wasm",
        r#"(module (memory (export "memory") 1) (func (export "_start") unreachable))"#,
    );
    let out = env.husk(&["run", "--name", "trap", &trap]);
    assert_eq!(out.status.code(), Some(134), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("husk: the guest trapped:"), "{err}");
    assert!(err.contains("unreachable"), "{err}");
    // The same line is in its log.
    assert!(stderr(&env.husk(&["logs", "trap"])).contains("the guest trapped"));

    let import = module(
        &env,
        "import.wasm",
        r#"(module (import "env" "no_such_function" (func)) (memory (export "memory") 1) (func (export "_start")))"#,
    );
    let out = env.husk(&["run", "--name", "import", &import]);
    assert_ne!(out.status.code(), Some(0));
    let err = stderr(&out);
    assert!(err.contains("no_such_function"), "{err}");
    env.finish();
}
