//! Conversions between the admin API's protobuf messages and the node's own types.

use rampart_proto::admin as pb;

use crate::auth::state::{
    Access, ClientType, ClientTypeSettings, ClientTypes, Credential, Defaults, PasswordMatch, Revocation, Role, Rule, UnknownCertificate,
    X509Match,
};
use crate::cluster::command::AuditEntry;

/// A client type; unspecified is DEVICE.
pub fn client_type(value: i32) -> ClientType {
    match pb::ClientType::try_from(value) {
        Ok(pb::ClientType::Application) => ClientType::Application,
        _ => ClientType::Device,
    }
}

/// The client type a request filters on, if any.
pub fn client_type_filter(value: i32) -> Option<ClientType> {
    (value != pb::ClientType::Unspecified as i32).then(|| client_type(value))
}

fn rule_to_pb(r: &Rule) -> pb::Rule {
    let access = match r.access {
        Access::Read => pb::Access::Read,
        Access::Write => pb::Access::Write,
        Access::ReadWrite => pb::Access::ReadWrite,
    };
    pb::Rule { access: access as i32, topic_regex: r.topic_regex.clone(), pattern: r.pattern.clone(), deny: r.deny }
}

/// An access; `None` when unspecified.
pub fn access_from_pb(access: pb::Access) -> Option<Access> {
    match access {
        pb::Access::Read => Some(Access::Read),
        pb::Access::Write => Some(Access::Write),
        pb::Access::ReadWrite => Some(Access::ReadWrite),
        pb::Access::Unspecified => None,
    }
}

fn rule_from_pb(r: pb::Rule, field: &str) -> Result<Rule, String> {
    let access = pb::Access::try_from(r.access).ok().and_then(access_from_pb);
    let access = access.ok_or_else(|| format!("{field}.access: must be READ, WRITE or READ_WRITE"))?;
    Ok(Rule { access, topic_regex: r.topic_regex, pattern: r.pattern, deny: r.deny })
}

fn rules_from_pb(rules: Vec<pb::Rule>, field: &str) -> Result<Vec<Rule>, String> {
    rules.into_iter().enumerate().map(|(i, r)| rule_from_pb(r, &format!("{field}[{i}]"))).collect()
}

pub fn credential_to_pb(c: &Credential) -> pb::Credential {
    pb::Credential {
        name: c.name.clone(),
        enabled: c.enabled,
        client_type: pb::ClientType::from(c.client_type) as i32,
        roles: c.roles.clone(),
        rules: c.rules.iter().map(rule_to_pb).collect(),
        x509: c.x509.as_ref().map(|x| pb::X509Match {
            identity: x.identity.clone(),
            identity_regex: x.identity_regex.clone(),
            priority: x.priority,
            issuer: x.issuer.clone(),
        }),
        password: c.password.as_ref().map(|p| pb::PasswordMatch {
            username: p.username.clone().unwrap_or_default(),
            client_id: p.client_id.clone(),
            hash: p.hash.clone(),
            scram_sha256: p.scram_sha256.clone(),
            scram_sha512: p.scram_sha512.clone(),
        }),
    }
}

/// Errors name the field (`credential.rules[0].access`).
pub fn credential_from_pb(c: pb::Credential) -> Result<Credential, String> {
    Ok(Credential {
        rules: rules_from_pb(c.rules, "credential.rules")?,
        name: c.name,
        enabled: c.enabled,
        client_type: client_type(c.client_type),
        roles: c.roles,
        x509: c.x509.map(|x| X509Match { identity: x.identity, identity_regex: x.identity_regex, priority: x.priority, issuer: x.issuer }),
        password: c.password.map(|p| PasswordMatch {
            username: Some(p.username).filter(|u| !u.is_empty()),
            client_id: p.client_id,
            hash: p.hash,
            scram_sha256: p.scram_sha256,
            scram_sha512: p.scram_sha512,
        }),
    })
}

pub fn role_to_pb(r: &Role) -> pb::Role {
    pb::Role { name: r.name.clone(), rules: r.rules.iter().map(rule_to_pb).collect() }
}

pub fn role_from_pb(r: pb::Role) -> Result<Role, String> {
    Ok(Role { rules: rules_from_pb(r.rules, "role.rules")?, name: r.name })
}

pub fn defaults_to_pb(d: &Defaults) -> pb::Defaults {
    let unknown = match d.unknown_certificate {
        UnknownCertificate::Reject => pb::UnknownCertificate::Reject,
        UnknownCertificate::DefaultRules => pb::UnknownCertificate::DefaultRules,
    };
    pb::Defaults {
        unknown_certificate: unknown as i32,
        rules: d.rules.iter().map(rule_to_pb).collect(),
        client_type: pb::ClientType::from(d.client_type) as i32,
        anonymous: d.anonymous,
        anonymous_rules: d.anonymous_rules.iter().map(rule_to_pb).collect(),
    }
}

/// What applies to an unknown certificate; unspecified is reject.
pub fn unknown_certificate(value: i32) -> UnknownCertificate {
    match pb::UnknownCertificate::try_from(value) {
        Ok(pb::UnknownCertificate::DefaultRules) => UnknownCertificate::DefaultRules,
        _ => UnknownCertificate::Reject,
    }
}

pub fn defaults_from_pb(d: pb::Defaults) -> Result<Defaults, String> {
    Ok(Defaults {
        unknown_certificate: unknown_certificate(d.unknown_certificate),
        rules: rules_from_pb(d.rules, "defaults.rules")?,
        client_type: client_type(d.client_type),
        anonymous: d.anonymous,
        anonymous_rules: rules_from_pb(d.anonymous_rules, "defaults.anonymous_rules")?,
    })
}

pub fn client_types_to_pb(t: &ClientTypes) -> pb::ClientTypes {
    let settings = |s: &ClientTypeSettings| pb::ClientTypeSettings { max_queued_messages: s.max_queued_messages.map(|n| n as u64) };
    pb::ClientTypes { device: Some(settings(&t.device)), application: Some(settings(&t.application)) }
}

pub fn client_types_from_pb(t: pb::ClientTypes) -> Result<ClientTypes, String> {
    let settings = |s: Option<pb::ClientTypeSettings>, field: &str| -> Result<ClientTypeSettings, String> {
        let max = s.and_then(|s| s.max_queued_messages);
        if max == Some(0) {
            return Err(format!("client_types.{field}.max_queued_messages: must be at least 1"));
        }
        Ok(ClientTypeSettings { max_queued_messages: max.map(|n| n as usize) })
    };
    Ok(ClientTypes { device: settings(t.device, "device")?, application: settings(t.application, "application")? })
}

pub fn revocation_to_pb(r: &Revocation) -> pb::Revocation {
    pb::Revocation {
        id: r.id,
        issuer: r.issuer.clone(),
        serial: r.serial.clone(),
        identity_regex: r.identity_regex.clone(),
        issued_before: r.issued_before,
        reason: r.reason.clone(),
        revoked_at: r.revoked_at,
        revoked_by: r.revoked_by.clone(),
        source: r.source.clone(),
    }
}

pub fn audit_to_pb(a: &AuditEntry) -> pb::AuditEntry {
    pb::AuditEntry {
        log_index: a.log_index,
        time: a.time,
        caller: a.caller.clone(),
        action: a.action.clone(),
        detail: a.detail.clone(),
        error: a.error.clone(),
    }
}
