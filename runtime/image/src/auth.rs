//! Registry credentials: `husk login` stores them in `<lib>/auth.json`
//! (mode 0600, the format of docker's config.json); pulls look there first,
//! then in docker's own config.json (`$DOCKER_CONFIG` or `~/.docker`).

use crate::{store_err, ImageError};
use base64::Engine as _;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct AuthFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct AuthEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    auth: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    password: Option<String>,
}

impl AuthEntry {
    fn credentials(&self) -> Option<(String, String)> {
        if let (Some(u), Some(p)) = (&self.username, &self.password) {
            return Some((u.clone(), p.clone()));
        }
        let raw = base64::engine::general_purpose::STANDARD
            .decode(self.auth.as_deref()?)
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (u, p) = text.split_once(':')?;
        Some((u.to_owned(), p.to_owned()))
    }
}

fn read(path: &Path) -> AuthFile {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn docker_config() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// Keys a registry may be stored under (docker uses the full URL for Hub).
fn keys(registry: &str) -> Vec<String> {
    let mut k = vec![
        registry.to_owned(),
        format!("https://{registry}"),
        format!("http://{registry}"),
    ];
    if registry == "docker.io" {
        k.push("https://index.docker.io/v1/".into());
    }
    k
}

/// Credentials for `registry`: husk's file, then docker's.
pub fn lookup(husk_file: &Path, registry: &str) -> Option<(String, String)> {
    lookup_in(
        std::iter::once(husk_file.to_owned()).chain(docker_config()),
        registry,
    )
}

fn lookup_in(files: impl Iterator<Item = PathBuf>, registry: &str) -> Option<(String, String)> {
    for f in files {
        let auth = read(&f);
        for k in keys(registry) {
            if let Some(c) = auth.auths.get(&k).and_then(AuthEntry::credentials) {
                return Some(c);
            }
        }
    }
    None
}

/// Stores credentials for `registry` in `husk_file` (created 0600).
pub fn store(husk_file: &Path, registry: &str, user: &str, pass: &str) -> Result<(), ImageError> {
    let mut auth = read(husk_file);
    auth.auths.insert(
        registry.to_owned(),
        AuthEntry {
            auth: Some(base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))),
            ..Default::default()
        },
    );
    write_private(husk_file, &auth)
}

/// Forgets `registry`; false if there was nothing stored.
pub fn remove(husk_file: &Path, registry: &str) -> Result<bool, ImageError> {
    let mut auth = read(husk_file);
    let had = auth.auths.remove(registry).is_some();
    if had {
        write_private(husk_file, &auth)?;
    }
    Ok(had)
}

fn write_private(path: &Path, auth: &AuthFile) -> Result<(), ImageError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(store_err(dir))?;
    let tmp = dir.join(format!(".auth.json.tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(store_err(&tmp))?;
    f.write_all(&serde_json::to_vec_pretty(auth).expect("json"))
        .and_then(|()| f.sync_all())
        .map_err(store_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(store_err(path))
}

/// The `key="value"` parameters of a `WWW-Authenticate: Bearer …` header.
fn bearer_params(header: &str) -> Option<BTreeMap<String, String>> {
    let rest = header.trim().strip_prefix("Bearer ")?;
    let mut out = BTreeMap::new();
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        out.insert(k.trim().to_owned(), v.trim().trim_matches('"').to_owned());
    }
    Some(out)
}

/// Checks credentials against the registry's `/v2/` endpoint; for a
/// registry that wants bearer tokens, by getting one from its token service
/// (as `docker login` does).
pub async fn verify(registry: &str, plain: bool, user: &str, pass: &str) -> Result<(), ImageError> {
    let url = format!("{}://{registry}/v2/", if plain { "http" } else { "https" });
    let err = |reason: String| ImageError::Registry {
        reference: registry.to_owned(),
        reason,
    };
    let resp = reqwest::Client::new()
        .get(&url)
        .basic_auth(user, Some(pass))
        .timeout(std::time::Duration::from_secs(15))
        .send()
        .await
        .map_err(|e| err(format!("cannot reach {url}: {e}")))?;
    let status = resp.status().as_u16();
    let bearer = resp
        .headers()
        .get("www-authenticate")
        .and_then(|h| h.to_str().ok())
        .and_then(bearer_params);
    let status = match (status, bearer) {
        (401, Some(p)) => {
            let realm = p
                .get("realm")
                .ok_or_else(|| err("the registry's bearer challenge names no realm".into()))?;
            let mut query = Vec::new();
            if let Some(s) = p.get("service") {
                query.push(("service", s.as_str()));
            }
            reqwest::Client::new()
                .get(realm)
                .query(&query)
                .basic_auth(user, Some(pass))
                .timeout(std::time::Duration::from_secs(15))
                .send()
                .await
                .map_err(|e| err(format!("cannot reach the token service {realm}: {e}")))?
                .status()
                .as_u16()
        }
        (s, _) => s,
    };
    match status {
        200..=299 => Ok(()),
        401 | 403 => Err(err("login failed: wrong user name or password".into())),
        s => Err(err(format!("login failed: {url} answered HTTP {s}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn stored_private_and_found_again() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("auth.json");
        store(&f, "127.0.0.1:5000", "alice", "s3cr:et").unwrap();
        assert_eq!(
            std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            lookup(&f, "127.0.0.1:5000"),
            Some(("alice".into(), "s3cr:et".into()))
        );
        assert!(remove(&f, "127.0.0.1:5000").unwrap());
        assert!(!remove(&f, "127.0.0.1:5000").unwrap());
        assert_eq!(read(&f).auths.len(), 0);
    }

    #[test]
    fn docker_config_json_is_honoured_after_husks_own() {
        let dir = tempfile::tempdir().unwrap();
        let husk = dir.path().join("auth.json");
        let docker = dir.path().join("config.json");
        std::fs::write(
            &docker,
            r#"{"auths":{"https://reg.example:5000":{"auth":"Ym9iOmh1bnRlcjI="},"other.example":{"username":"u","password":"p"}}}"#,
        )
        .unwrap();
        let files = || [husk.clone(), docker.clone()].into_iter();
        assert_eq!(
            lookup_in(files(), "reg.example:5000"),
            Some(("bob".into(), "hunter2".into()))
        );
        assert_eq!(
            lookup_in(files(), "other.example"),
            Some(("u".into(), "p".into()))
        );
        store(&husk, "reg.example:5000", "alice", "x").unwrap();
        assert_eq!(
            lookup_in(files(), "reg.example:5000"),
            Some(("alice".into(), "x".into()))
        );
        assert_eq!(lookup_in(files(), "nowhere.example"), None);
    }
}
