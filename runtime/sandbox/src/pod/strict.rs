//! Strict field checking of a manifest document, as `kubectl apply
//! --validate=strict` does: every key of the objects husk reads must be a
//! field of the Kubernetes v1 API, or the document is refused, naming the
//! field path and the nearest known name. A typo such as `readonly: true`
//! would otherwise leave a hostPath writable without a word.
//!
//! It checks names only, against the API's own field lists (fields husk
//! accepts and does not use are known too); meaning is `manifest`'s.
//! Free-form maps (labels, annotations, resource quantities, data) and the
//! subtrees husk does not model (probes, affinity, tolerations …) are not
//! looked into.

use serde_yaml::Value;

/// What a key's value is.
#[derive(Clone, Copy)]
enum Node {
    /// Not looked into.
    Any,
    Obj(Kind),
    List(Kind),
}

/// The API object kinds whose fields are checked.
#[derive(Clone, Copy)]
enum Kind {
    PodDoc,
    ConfigMapDoc,
    SecretDoc,
    Meta,
    PodSpec,
    Container,
    Port,
    EnvVar,
    EnvVarSource,
    KeyRef,
    FieldRef,
    ResourceFieldRef,
    EnvFrom,
    ObjRef,
    VolumeMount,
    Resources,
    SecurityContext,
    Capabilities,
    Seccomp,
    PodSecurityContext,
    Sysctl,
    Volume,
    HostPath,
    EmptyDir,
    ConfigMapVolume,
    SecretVolume,
    KeyToPath,
    DnsConfig,
    DnsOption,
    HostAlias,
}

use Kind::*;
use Node::{Any, List, Obj};

fn fields(k: Kind) -> &'static [(&'static str, Node)] {
    match k {
        PodDoc => &[
            ("apiVersion", Any),
            ("kind", Any),
            ("metadata", Obj(Meta)),
            ("spec", Obj(PodSpec)),
            ("status", Any),
        ],
        ConfigMapDoc => &[
            ("apiVersion", Any),
            ("kind", Any),
            ("metadata", Obj(Meta)),
            ("data", Any),
            ("binaryData", Any),
            ("immutable", Any),
        ],
        SecretDoc => &[
            ("apiVersion", Any),
            ("kind", Any),
            ("metadata", Obj(Meta)),
            ("data", Any),
            ("stringData", Any),
            ("type", Any),
            ("immutable", Any),
        ],
        Meta => &[
            ("name", Any),
            ("namespace", Any),
            ("labels", Any),
            ("annotations", Any),
            ("generateName", Any),
            ("uid", Any),
            ("resourceVersion", Any),
            ("generation", Any),
            ("creationTimestamp", Any),
            ("deletionTimestamp", Any),
            ("deletionGracePeriodSeconds", Any),
            ("finalizers", Any),
            ("managedFields", Any),
            ("ownerReferences", Any),
            ("selfLink", Any),
        ],
        PodSpec => &[
            ("containers", List(Container)),
            ("initContainers", List(Container)),
            ("ephemeralContainers", Any),
            ("volumes", List(Volume)),
            ("restartPolicy", Any),
            ("runtimeClassName", Any),
            ("terminationGracePeriodSeconds", Any),
            ("activeDeadlineSeconds", Any),
            ("hostname", Any),
            ("subdomain", Any),
            ("setHostnameAsFQDN", Any),
            ("dnsPolicy", Any),
            ("dnsConfig", Obj(DnsConfig)),
            ("hostAliases", List(HostAlias)),
            ("securityContext", Obj(PodSecurityContext)),
            ("shareProcessNamespace", Any),
            ("hostNetwork", Any),
            ("hostPID", Any),
            ("hostIPC", Any),
            ("hostUsers", Any),
            ("affinity", Any),
            ("automountServiceAccountToken", Any),
            ("enableServiceLinks", Any),
            ("imagePullSecrets", Any),
            ("nodeName", Any),
            ("nodeSelector", Any),
            ("os", Any),
            ("overhead", Any),
            ("preemptionPolicy", Any),
            ("priority", Any),
            ("priorityClassName", Any),
            ("readinessGates", Any),
            ("resourceClaims", Any),
            ("resources", Obj(Resources)),
            ("schedulerName", Any),
            ("schedulingGates", Any),
            ("serviceAccount", Any),
            ("serviceAccountName", Any),
            ("tolerations", Any),
            ("topologySpreadConstraints", Any),
        ],
        Container => &[
            ("name", Any),
            ("image", Any),
            ("command", Any),
            ("args", Any),
            ("workingDir", Any),
            ("env", List(EnvVar)),
            ("envFrom", List(EnvFrom)),
            ("ports", List(Port)),
            ("volumeMounts", List(VolumeMount)),
            ("resources", Obj(Resources)),
            ("securityContext", Obj(SecurityContext)),
            ("stdin", Any),
            ("stdinOnce", Any),
            ("tty", Any),
            ("restartPolicy", Any),
            ("imagePullPolicy", Any),
            ("lifecycle", Any),
            ("livenessProbe", Any),
            ("readinessProbe", Any),
            ("startupProbe", Any),
            ("resizePolicy", Any),
            ("terminationMessagePath", Any),
            ("terminationMessagePolicy", Any),
            ("volumeDevices", Any),
        ],
        Port => &[
            ("name", Any),
            ("containerPort", Any),
            ("hostPort", Any),
            ("hostIP", Any),
            ("protocol", Any),
        ],
        EnvVar => &[
            ("name", Any),
            ("value", Any),
            ("valueFrom", Obj(EnvVarSource)),
        ],
        EnvVarSource => &[
            ("configMapKeyRef", Obj(KeyRef)),
            ("secretKeyRef", Obj(KeyRef)),
            ("fieldRef", Obj(FieldRef)),
            ("resourceFieldRef", Obj(ResourceFieldRef)),
        ],
        KeyRef => &[("name", Any), ("key", Any), ("optional", Any)],
        FieldRef => &[("apiVersion", Any), ("fieldPath", Any)],
        ResourceFieldRef => &[("containerName", Any), ("resource", Any), ("divisor", Any)],
        EnvFrom => &[
            ("configMapRef", Obj(ObjRef)),
            ("secretRef", Obj(ObjRef)),
            ("prefix", Any),
        ],
        ObjRef => &[("name", Any), ("optional", Any)],
        VolumeMount => &[
            ("name", Any),
            ("mountPath", Any),
            ("readOnly", Any),
            ("recursiveReadOnly", Any),
            ("subPath", Any),
            ("subPathExpr", Any),
            ("mountPropagation", Any),
        ],
        Resources => &[("limits", Any), ("requests", Any), ("claims", Any)],
        SecurityContext => &[
            ("runAsUser", Any),
            ("runAsGroup", Any),
            ("runAsNonRoot", Any),
            ("readOnlyRootFilesystem", Any),
            ("allowPrivilegeEscalation", Any),
            ("privileged", Any),
            ("capabilities", Obj(Capabilities)),
            ("seccompProfile", Obj(Seccomp)),
            ("appArmorProfile", Any),
            ("procMount", Any),
            ("seLinuxOptions", Any),
            ("windowsOptions", Any),
        ],
        Capabilities => &[("add", Any), ("drop", Any)],
        Seccomp => &[("type", Any), ("localhostProfile", Any)],
        PodSecurityContext => &[
            ("runAsUser", Any),
            ("runAsGroup", Any),
            ("runAsNonRoot", Any),
            ("supplementalGroups", Any),
            ("supplementalGroupsPolicy", Any),
            ("fsGroup", Any),
            ("fsGroupChangePolicy", Any),
            ("sysctls", List(Sysctl)),
            ("seccompProfile", Obj(Seccomp)),
            ("appArmorProfile", Any),
            ("seLinuxOptions", Any),
            ("seLinuxChangePolicy", Any),
            ("windowsOptions", Any),
        ],
        Sysctl => &[("name", Any), ("value", Any)],
        Volume => &[
            ("name", Any),
            ("hostPath", Obj(HostPath)),
            ("emptyDir", Obj(EmptyDir)),
            ("configMap", Obj(ConfigMapVolume)),
            ("secret", Obj(SecretVolume)),
            ("awsElasticBlockStore", Any),
            ("azureDisk", Any),
            ("azureFile", Any),
            ("cephfs", Any),
            ("cinder", Any),
            ("csi", Any),
            ("downwardAPI", Any),
            ("ephemeral", Any),
            ("fc", Any),
            ("flexVolume", Any),
            ("flocker", Any),
            ("gcePersistentDisk", Any),
            ("gitRepo", Any),
            ("glusterfs", Any),
            ("image", Any),
            ("iscsi", Any),
            ("nfs", Any),
            ("persistentVolumeClaim", Any),
            ("photonPersistentDisk", Any),
            ("portworxVolume", Any),
            ("projected", Any),
            ("quobyte", Any),
            ("rbd", Any),
            ("scaleIO", Any),
            ("storageos", Any),
            ("vsphereVolume", Any),
        ],
        HostPath => &[("path", Any), ("type", Any)],
        EmptyDir => &[("medium", Any), ("sizeLimit", Any)],
        ConfigMapVolume => &[
            ("name", Any),
            ("items", List(KeyToPath)),
            ("defaultMode", Any),
            ("optional", Any),
        ],
        SecretVolume => &[
            ("secretName", Any),
            ("items", List(KeyToPath)),
            ("defaultMode", Any),
            ("optional", Any),
        ],
        KeyToPath => &[("key", Any), ("path", Any), ("mode", Any)],
        DnsConfig => &[
            ("nameservers", Any),
            ("searches", Any),
            ("options", List(DnsOption)),
        ],
        DnsOption => &[("name", Any), ("value", Any)],
        HostAlias => &[("ip", Any), ("hostnames", Any)],
    }
}

/// An unknown field: its path (`spec.containers[0].volumeMounts[0].readonly`)
/// and what to do about it.
#[derive(Debug, PartialEq)]
pub struct UnknownField {
    pub path: String,
    pub msg: String,
}

/// Checks the keys of a `kind` document (Pod, ConfigMap or Secret).
/// Values of the wrong type are left to the typed reading, which names them.
pub fn check(kind: &str, doc: &Value) -> Result<(), UnknownField> {
    let k = match kind {
        "Pod" => PodDoc,
        "ConfigMap" => ConfigMapDoc,
        _ => SecretDoc,
    };
    walk(k, doc, "")
}

fn walk(k: Kind, v: &Value, path: &str) -> Result<(), UnknownField> {
    let Some(map) = v.as_mapping() else {
        return Ok(());
    };
    let known = fields(k);
    for (key, value) in map {
        let Some(name) = key.as_str() else {
            return Err(UnknownField {
                path: path.to_owned(),
                msg: format!("field names are strings; found {key:?}"),
            });
        };
        let here = if path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        };
        let Some((_, node)) = known.iter().find(|(n, _)| *n == name) else {
            return Err(UnknownField {
                msg: unknown_message(name, known),
                path: here,
            });
        };
        match node {
            Any => {}
            Obj(k) => walk(*k, value, &here)?,
            List(k) => {
                if let Some(items) = value.as_sequence() {
                    for (i, item) in items.iter().enumerate() {
                        walk(*k, item, &format!("{here}[{i}]"))?;
                    }
                }
            }
        }
    }
    Ok(())
}

fn unknown_message(name: &str, known: &[(&str, Node)]) -> String {
    let lower = name.to_ascii_lowercase();
    let nearest = known
        .iter()
        .map(|(n, _)| (edit_distance(&lower, &n.to_ascii_lowercase()), *n))
        .min();
    match nearest {
        Some((d, n)) if d <= (name.len() / 3).max(2) => {
            format!("unknown field {name:?}; did you mean {n:?}? (fields are case-sensitive)")
        }
        _ => {
            let names: Vec<&str> = known.iter().map(|(n, _)| *n).collect();
            format!(
                "unknown field {name:?}; the fields here are {}",
                names.join(", ")
            )
        }
    }
}

/// Levenshtein distance, for the nearest known name.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Result<(), UnknownField> {
        check("Pod", &serde_yaml::from_str(yaml).unwrap())
    }

    #[test]
    fn a_typo_is_refused_with_its_path_and_the_nearest_name() {
        let e = pod("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  containers:\n  - name: c\n    image: x\n    volumeMounts:\n    - {name: d, mountPath: /d, readonly: true}\n").unwrap_err();
        assert_eq!(e.path, "spec.containers[0].volumeMounts[0].readonly");
        assert!(e.msg.contains("did you mean \"readOnly\""), "{}", e.msg);
        let e = pod("kind: Pod\nspec:\n  containers:\n  - name: c\n    resources:\n      limit: {memory: 1Mi}\n").unwrap_err();
        assert_eq!(e.path, "spec.containers[0].resources.limit");
        assert!(e.msg.contains("\"limits\""), "{}", e.msg);
        let e = pod(
            "kind: Pod\nspec:\n  volumes:\n  - name: v\n    hostPath: {path: /x, readOnly: true}\n",
        )
        .unwrap_err();
        assert_eq!(e.path, "spec.volumes[0].hostPath.readOnly");
        let e = pod("kind: Pod\nspec: {}\nfrobnicate: 1\n").unwrap_err();
        assert_eq!(e.path, "frobnicate");
        assert!(
            e.msg.contains("the fields here are apiVersion"),
            "{}",
            e.msg
        );
        let e = pod("kind: Pod\nspec:\n  initContainers:\n  - env:\n    - name: A\n      valueFrom: {secretKeyRef: {name: s, key: k, optinal: true}}\n").unwrap_err();
        assert_eq!(
            e.path,
            "spec.initContainers[0].env[0].valueFrom.secretKeyRef.optinal"
        );
        let e = check(
            "ConfigMap",
            &serde_yaml::from_str("kind: ConfigMap\nmetadata: {name: a}\nstringData: {a: b}\n")
                .unwrap(),
        )
        .unwrap_err();
        assert_eq!(e.path, "stringData");
    }

    #[test]
    fn api_fields_husk_does_not_use_and_free_form_maps_are_accepted() {
        pod("apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  labels: {anything: goes}\n  annotations: {x/y: z}\nspec:\n  nodeSelector: {disk: ssd}\n  tolerations: [{key: k}]\n  containers:\n  - name: c\n    image: x\n    imagePullPolicy: IfNotPresent\n    livenessProbe: {httpGet: {path: /, port: 80}}\n    resources: {limits: {memory: 1Mi, example.com/gpu: 1}}\n    securityContext: {capabilities: {drop: [ALL]}, seccompProfile: {type: RuntimeDefault}}\n  volumes:\n  - {name: e, emptyDir: {medium: Memory, sizeLimit: 1Mi}}\n  - {name: s, secret: {secretName: s, items: [{key: k, path: p, mode: 256}]}}\n").unwrap();
        // A value of the wrong shape is not this module's to judge.
        pod("kind: Pod\nspec:\n  containers: 3\n").unwrap();
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("readonly", "readonly"), 0);
        assert_eq!(edit_distance("limit", "limits"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
