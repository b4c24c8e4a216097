//! The files the kubelet writes for every container of a Linux pod:
//! /etc/hostname, /etc/hosts (localhost, the pod's own IP and name,
//! spec.hostAliases) and /etc/resolv.conf (the host's, merged with
//! spec.dnsConfig as the kubelet merges it; only dnsConfig under dnsPolicy
//! None). Pure functions; the VM sandbox hands the result to the guest.

use crate::pod::{DnsPlan, PodPlan};

/// The kubelet's limits.
const MAX_NAMESERVERS: usize = 3;
const MAX_SEARCHES: usize = 32;

/// /etc/hosts for the pod, with its IPs (as the kubelet writes them).
pub fn hosts_file(plan: &PodPlan, pod_ips: &[String]) -> String {
    let mut s = String::from(
        "# Kubernetes-managed hosts file (husk).\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\n\
         fe00::0\tip6-mcastprefix\n\
         fe00::1\tip6-allnodes\n\
         fe00::2\tip6-allrouters\n",
    );
    for ip in pod_ips {
        s.push_str(&format!("{ip}\t{}\n", plan.hostname));
    }
    if !plan.host_aliases.is_empty() {
        s.push_str("\n# Entries added by HostAliases.\n");
        for (ip, names) in &plan.host_aliases {
            s.push_str(&format!("{ip}\t{}\n", names.join("\t")));
        }
    }
    s
}

/// /etc/resolv.conf for the pod, from the host's `host_resolv` text.
/// Loopback nameservers of the host (a local stub resolver) are left out:
/// the pod has a loopback of its own, and they would not answer there.
pub fn resolv_conf(dns: &DnsPlan, host_resolv: &str) -> String {
    let (mut servers, mut searches, mut options) = (Vec::new(), Vec::new(), Vec::new());
    if !dns.policy_none {
        for line in host_resolv.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    if let Some(ip) = words.next() {
                        let loopback = ip
                            .parse::<std::net::IpAddr>()
                            .is_ok_and(|a| a.is_loopback());
                        if !loopback {
                            servers.push(ip.to_owned());
                        }
                    }
                }
                // The last search or domain line wins, as in the resolver.
                Some("search") | Some("domain") => {
                    searches = words.map(str::to_owned).collect();
                }
                Some("options") => options.extend(words.map(str::to_owned)),
                _ => {}
            }
        }
    }
    for n in &dns.nameservers {
        servers.push(n.clone());
    }
    searches.extend(dns.searches.iter().cloned());
    // An option set in dnsConfig replaces the host's of the same name.
    for o in &dns.options {
        let name = o.split(':').next().unwrap_or(o);
        options.retain(|x: &String| x.split(':').next() != Some(name));
        options.push(o.clone());
    }
    dedup(&mut servers);
    dedup(&mut searches);
    servers.truncate(MAX_NAMESERVERS);
    searches.truncate(MAX_SEARCHES);
    let mut s = String::new();
    for n in &servers {
        s.push_str(&format!("nameserver {n}\n"));
    }
    if !searches.is_empty() {
        s.push_str(&format!("search {}\n", searches.join(" ")));
    }
    if !options.is_empty() {
        s.push_str(&format!("options {}\n", options.join(" ")));
    }
    s
}

fn dedup(v: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    v.retain(|x| seen.insert(x.clone()));
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "# generated\nnameserver 127.0.0.53\nnameserver 10.0.0.2\n\
                        domain old.example\nsearch corp.example\noptions edns0 ndots:2\n";

    #[test]
    fn the_hosts_resolv_conf_is_merged_with_dns_config() {
        let dns = DnsPlan {
            policy_none: false,
            nameservers: vec!["10.0.0.2".into(), "192.0.2.1".into()],
            searches: vec!["ns1.svc.example".into()],
            options: vec!["ndots:5".into(), "rotate".into()],
        };
        assert_eq!(
            resolv_conf(&dns, HOST),
            "nameserver 10.0.0.2\nnameserver 192.0.2.1\n\
             search corp.example ns1.svc.example\noptions edns0 ndots:5 rotate\n"
        );
    }

    #[test]
    fn policy_none_takes_only_dns_config() {
        let dns = DnsPlan {
            policy_none: true,
            nameservers: vec!["192.0.2.53".into()],
            ..Default::default()
        };
        assert_eq!(resolv_conf(&dns, HOST), "nameserver 192.0.2.53\n");
    }

    #[test]
    fn hosts_carry_the_pod_and_its_aliases() {
        let plan = PodPlan {
            hostname: "web-0".into(),
            host_aliases: vec![("192.0.2.7".into(), vec!["db".into(), "db.local".into()])],
            ..serde_json::from_str(
                r#"{"name":"web-0","namespace":"default","uid":"u","labels":{},
                "annotations":{},"runtimeClass":"husk-vm","restartPolicy":"Never",
                "gracePeriodSecs":1,"initContainers":[],"containers":[],"volumes":[],
                "cpuLimitMillis":null,"source":null}"#,
            )
            .unwrap()
        };
        let h = hosts_file(&plan, &["10.88.0.4".into(), "fd00:88::4".into()]);
        assert!(h.starts_with("# Kubernetes-managed hosts file"), "{h}");
        assert!(h.contains("127.0.0.1\tlocalhost\n"), "{h}");
        assert!(h.contains("\n10.88.0.4\tweb-0\nfd00:88::4\tweb-0\n"), "{h}");
        assert!(h.ends_with("192.0.2.7\tdb\tdb.local\n"), "{h}");
        assert!(!hosts_file(&plan, &[]).contains("web-0\n"));
    }
}
