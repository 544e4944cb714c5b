//! Avro protocols as the IPC handshake sees them: the exact JSON text, its MD5 (the hash peers
//! exchange), and for each message a signature that says whether two protocols agree on it.
//!
//! Signatures are the Parsing Canonical Form (`apache-avro`) of the message's request fields and
//! response type, with every named type inlined, so two texts that differ only in docs, order of
//! keys or whitespace agree, and any difference in the data layout does not. The IPC layer does
//! not do Avro schema resolution: a client whose message differs is answered with an error.

use std::collections::HashMap;

use apache_avro::Schema;
use md5::{Digest, Md5};
use serde_json::{Map, Value};

/// Why a protocol text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Avro protocol: {0}")]
pub struct ProtocolError(pub String);

/// One message of a protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageSignature {
    /// The canonical form of the request fields and the response type.
    pub canonical: String,
    /// True for a one-way message (no response).
    pub one_way: bool,
}

/// A parsed protocol.
#[derive(Debug, Clone)]
pub struct Protocol {
    name: String,
    text: String,
    hash: [u8; 16],
    messages: HashMap<String, MessageSignature>,
}

/// The MD5 of a protocol text, as sent in handshakes.
pub fn protocol_hash(text: &str) -> [u8; 16] {
    Md5::digest(text.as_bytes()).into()
}

/// A hash as lowercase hex (for logs).
pub fn hex(hash: &[u8]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

impl Protocol {
    /// Parses a protocol's JSON text; the hash is the MD5 of exactly these bytes.
    ///
    /// # Errors
    /// [`ProtocolError`] if the text is not a protocol or a type in it is invalid.
    pub fn parse(text: &str) -> Result<Protocol, ProtocolError> {
        let err = |m: String| ProtocolError(m);
        let json: Value = serde_json::from_str(text).map_err(|e| err(format!("not JSON: {e}")))?;
        let obj = json
            .as_object()
            .ok_or_else(|| err("not a JSON object".into()))?;
        let name = obj
            .get("protocol")
            .and_then(Value::as_str)
            .ok_or_else(|| err("no \"protocol\" name".into()))?
            .to_string();
        let namespace = obj.get("namespace").and_then(Value::as_str);
        let with_namespace = |v: &Value| -> Value {
            let mut v = v.clone();
            if let (Some(ns), Some(o)) = (namespace, v.as_object_mut()) {
                let bare = o
                    .get("name")
                    .and_then(Value::as_str)
                    .is_some_and(|n| !n.contains('.'));
                if bare && !o.contains_key("namespace") {
                    o.insert("namespace".into(), Value::String(ns.into()));
                }
            }
            v
        };
        let types: Vec<String> = match obj.get("types") {
            None => Vec::new(),
            Some(Value::Array(a)) => a.iter().map(|t| with_namespace(t).to_string()).collect(),
            Some(_) => return Err(err("\"types\" is not an array".into())),
        };
        let schemata = if types.is_empty() {
            Vec::new()
        } else {
            Schema::parse_list(&types).map_err(|e| err(format!("types: {e}")))?
        };
        let mut messages = HashMap::new();
        match obj.get("messages") {
            None => {}
            Some(Value::Object(m)) => {
                for (mname, msg) in m {
                    let sig = signature(msg, namespace, &types, &schemata)
                        .map_err(|e| err(format!("message {mname:?}: {e}")))?;
                    messages.insert(mname.clone(), sig);
                }
            }
            Some(_) => return Err(err("\"messages\" is not an object".into())),
        }
        Ok(Protocol {
            name,
            hash: protocol_hash(text),
            text: text.to_string(),
            messages,
        })
    }

    /// The protocol's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The exact text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The MD5 of the text.
    pub fn hash(&self) -> [u8; 16] {
        self.hash
    }

    /// A message by name.
    pub fn message(&self, name: &str) -> Option<&MessageSignature> {
        self.messages.get(name)
    }

    /// True if `other` declares message `name` with the same layout as this protocol.
    pub fn agrees_on(&self, other: &Protocol, name: &str) -> bool {
        matches!((self.message(name), other.message(name)), (Some(a), Some(b)) if a == b)
    }
}

fn signature(
    msg: &Value,
    namespace: Option<&str>,
    types: &[String],
    schemata: &[Schema],
) -> Result<MessageSignature, String> {
    let msg = msg.as_object().ok_or("not an object")?;
    let request = msg.get("request").ok_or("no \"request\"")?;
    if !request.is_array() {
        return Err("\"request\" is not an array of fields".into());
    }
    let response = msg.get("response").ok_or("no \"response\"")?;
    let one_way = msg.get("one-way").and_then(Value::as_bool).unwrap_or(false);
    // One record holding the request fields and the response as fields, in the protocol's
    // namespace so that its type names resolve.
    let mut fields = request.as_array().cloned().unwrap_or_default();
    let mut resp = Map::new();
    resp.insert("name".into(), Value::String("weir_response".into()));
    resp.insert("type".into(), response.clone());
    fields.push(Value::Object(resp));
    let mut record = Map::new();
    record.insert("type".into(), Value::String("record".into()));
    record.insert("name".into(), Value::String("WeirMessage".into()));
    if let Some(ns) = namespace {
        record.insert("namespace".into(), Value::String(ns.into()));
    }
    record.insert("fields".into(), Value::Array(fields));
    let (schema, _) = Schema::parse_str_with_list(&Value::Object(record).to_string(), types)
        .map_err(|e| e.to_string())?;
    let canonical = schema
        .independent_canonical_form(schemata)
        .map_err(|e| e.to_string())?;
    Ok(MessageSignature { canonical, one_way })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flume::{AVRO_SOURCE_AVRO1111, AVRO_SOURCE_LEGACY};

    #[test]
    fn both_flume_texts_parse_hash_as_known_and_agree() {
        let legacy = Protocol::parse(AVRO_SOURCE_LEGACY).unwrap();
        let new = Protocol::parse(AVRO_SOURCE_AVRO1111).unwrap();
        assert_eq!(hex(&legacy.hash()), "86aadae2c45474c0fe93ffd0f2350a65");
        assert_eq!(hex(&new.hash()), "8076c53714e01f6e2c1deb9544e7b1fe");
        assert_eq!(legacy.name(), "AvroSourceProtocol");
        for m in ["append", "appendBatch"] {
            assert!(legacy.agrees_on(&new, m), "{m}");
        }
        assert!(!legacy.agrees_on(&new, "nope"));
        let sig = &legacy.message("append").unwrap().canonical;
        assert!(
            sig.contains("org.apache.flume.source.avro.AvroFlumeEvent"),
            "{sig}"
        );
        assert!(sig.contains("\"bytes\""), "{sig}");
    }

    #[test]
    fn a_different_layout_disagrees_and_garbage_is_an_error() {
        let legacy = Protocol::parse(AVRO_SOURCE_LEGACY).unwrap();
        let changed = AVRO_SOURCE_LEGACY.replace(
            "\"body\",\"type\":\"bytes\"",
            "\"body\",\"type\":\"string\"",
        );
        assert_ne!(changed, AVRO_SOURCE_LEGACY);
        let changed = Protocol::parse(&changed).unwrap();
        assert!(!legacy.agrees_on(&changed, "append"));
        assert!(!legacy.agrees_on(&changed, "nonexistent"));
        for bad in ["", "[]", "{}", "{\"protocol\":\"P\",\"types\":[{\"type\":\"record\"}]}",
                    "{\"protocol\":\"P\",\"messages\":{\"m\":{\"request\":[{\"name\":\"x\",\"type\":\"Nope\"}],\"response\":\"null\"}}}"] {
            assert!(Protocol::parse(bad).is_err(), "{bad}");
        }
    }
}
