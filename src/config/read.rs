//! Reading a configuration document into a [`Config`] so that one pass reports every key that
//! cannot be read, not only the first: a file with three typos costs its author one round, not
//! three.
//!
//! serde stops at the first error, so the document is first parsed into a tree (YAML or TOML,
//! only its syntax checked; YAML's merge keys applied), and the tree is read into a `Config`
//! again and again: each error names its key path (`serde_path_to_error`), the key is taken
//! out of the tree, and the next read gives that key its default and goes on to the next error.
//! A key no struct has is named by its own path (`server.bogus: unknown field, expected one of
//! ...`). An element of a list that lacks a field it needs (an endpoint's `url`) goes too; when
//! the field was there but could not be read, that one problem is reported, not a second one
//! for its absence. Syntax errors keep their line and column; the keys' problems have their
//! path, as the tree keeps no positions.
//!
//! Invariants:
//! - Each round removes one node of the tree, so the rounds end; at most [`MAX_PROBLEMS`] are
//!   reported.
//! - Paths are the document's: an element taken out of a list does not renumber the elements
//!   after it in later problems.
//! - The semantic checks ([`Config::validate`]) run on what could be read; a problem of theirs
//!   that names a key taken out (or a key inside or around it) is not reported, as it would be
//!   about a default the author never wrote.

use serde_path_to_error::Segment;
use serde_yaml::Value;

use super::Config;

/// Most problems reported for one document: more than any file a person wrote has, and a bound
/// for one that is not.
pub const MAX_PROBLEMS: usize = 64;

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

/// Parses `text` (TOML or YAML) and reads it: the configuration and every problem, each
/// naming its key. An empty document (or one of only comments) is all defaults.
pub fn read(text: &str, toml: bool) -> Result<Config, Vec<String>> {
    let tree: Value = if toml {
        toml::from_str(text).map_err(|e| e.to_string())
    } else {
        // YAML's merge keys (`<<: *anchor`) take effect: an endpoint may repeat another's
        // settings.
        serde_yaml::from_str(text)
            .and_then(|mut tree: Value| tree.apply_merge().map(|()| tree))
            .map_err(|e| e.to_string())
    }
    .map_err(|e| vec![e.trim_end().to_string()])?;
    let (config, mut problems, unread) = read_tree(tree);
    if let Err(more) = config.validate() {
        // Their indices count the elements left in each list: number them as the document does.
        let more = more.into_iter().map(|p| match p.split_once(": ") {
            Some((key, rest)) => format!("{}: {rest}", unread.renumber(key)),
            None => p,
        });
        problems.extend(more.filter(|p| !unread.paths.iter().any(|u| touches(p, u))));
        problems.truncate(MAX_PROBLEMS);
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems)
    }
}

/// The keys taken out of the tree, in the document's numbering.
#[derive(Default)]
struct Unread {
    paths: Vec<String>,
    /// Elements taken out of lists: the list's path and the element's index.
    elements: Vec<(String, usize)>,
}

impl Unread {
    /// `key` of the tree as it is now (`a.b[1].c`), in the document's numbering: each index
    /// counts the elements of its list taken out before it.
    fn renumber(&self, key: &str) -> String {
        let mut out = String::with_capacity(key.len());
        let mut rest = key;
        while let Some(open) = rest.find('[') {
            out.push_str(&rest[..open]);
            let index = rest[open + 1..].split_once(']');
            let Some((Ok(i), after)) = index.map(|(i, after)| (i.parse::<usize>(), after)) else {
                // Not an index (a bracket in a namespace's name, say): as it is.
                out.push('[');
                rest = &rest[open + 1..];
                continue;
            };
            let mut taken: Vec<usize> = self
                .elements
                .iter()
                .filter(|(list, _)| *list == out)
                .map(|(_, j)| *j)
                .collect();
            taken.sort_unstable();
            // The i-th element left is the i-th index not taken.
            let mut j = i;
            for t in taken {
                if t <= j {
                    j += 1;
                }
            }
            out.push('[');
            out.push_str(&j.to_string());
            out.push(']');
            rest = after;
        }
        out.push_str(rest);
        out
    }
}

/// Reads `tree`, taking out each key that cannot be read until the rest can: the
/// configuration, the problems found, and the keys taken out.
fn read_tree(mut tree: Value) -> (Config, Vec<String>, Unread) {
    if tree.is_null() {
        tree = Value::Mapping(Default::default());
    }
    keys_as_text(&mut tree);
    let mut problems = Vec::new();
    let mut unread = Unread::default();
    loop {
        let err = match serde_path_to_error::deserialize::<_, Config>(tree.clone()) {
            Ok(config) => return (config, problems, unread),
            Err(e) => e,
        };
        let mut at: Vec<Step> = err
            .path()
            .iter()
            .filter_map(|s| match s {
                Segment::Seq { index } => Some(Step::Index(*index)),
                Segment::Map { key } => Some(Step::Key(key.clone())),
                Segment::Enum { .. } | Segment::Unknown => None,
            })
            .collect();
        let mut message = err.inner().to_string();
        // The path names the key serde does not know; its message names it again.
        if let Some(rest) = message.strip_prefix("unknown field `") {
            if let Some((field, rest)) = rest.split_once('`') {
                let field = Step::Key(field.to_string());
                if at.last() != Some(&field) {
                    at.push(field);
                }
                message = format!("unknown field{rest}");
            }
        }
        let path = unread.renumber(&show(&at));
        // A field it needs was taken out, already reported: the rest of it goes too, unsaid.
        let needed = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split_once('`'))
            .is_some_and(|(field, _)| unread.paths.contains(&format!("{path}.{field}")));
        if !needed {
            problems.push(if path.is_empty() {
                message
            } else {
                format!("{path}: {message}")
            });
        }
        let removed = remove(&mut tree, &at);
        if let (true, Some(Step::Index(_))) = (removed, at.last()) {
            let open = path
                .rfind('[')
                .expect("an element's path ends in its index");
            let index = path[open + 1..path.len() - 1].parse().expect("an index");
            unread.elements.push((path[..open].to_string(), index));
        }
        unread.paths.push(path);
        if !removed || problems.len() >= MAX_PROBLEMS {
            // Nothing more can be read (the document is not a mapping, say): what was found is
            // the report.
            return (Config::default(), problems, unread);
        }
    }
}

/// Mapping keys that YAML reads as numbers or booleans made text, as every key of the file is
/// (a namespace named `2024:` is `"2024"`, not a type error).
fn keys_as_text(node: &mut Value) {
    match node {
        Value::Mapping(m) => {
            let plain = |k: &Value| matches!(k, Value::Number(_) | Value::Bool(_));
            if m.keys().any(plain) {
                *m = std::mem::take(m)
                    .into_iter()
                    .map(|(k, v)| match k {
                        Value::Number(n) => (Value::String(n.to_string()), v),
                        Value::Bool(b) => (Value::String(b.to_string()), v),
                        k => (k, v),
                    })
                    .collect();
            }
            m.values_mut().for_each(keys_as_text);
        }
        Value::Sequence(s) => s.iter_mut().for_each(keys_as_text),
        Value::Tagged(t) => keys_as_text(&mut t.value),
        _ => {}
    }
}

/// Takes the node at `at` out of `tree`; false when there is none (the path is the root).
fn remove(tree: &mut Value, at: &[Step]) -> bool {
    let Some((last, parents)) = at.split_last() else {
        return false;
    };
    let mut node = tree;
    for step in parents {
        let Some(next) = child(node, step) else {
            return false;
        };
        node = next;
    }
    let node = untagged(node);
    match (node, last) {
        (Value::Mapping(m), Step::Key(k)) => {
            let key = m.keys().find(|key| key_is(key, k)).cloned();
            // Kept in order: the next problems come in the document's order too.
            key.and_then(|key| m.shift_remove(&key)).is_some()
        }
        (Value::Sequence(s), Step::Index(i)) if *i < s.len() => {
            s.remove(*i);
            true
        }
        _ => false,
    }
}

fn child<'v>(node: &'v mut Value, step: &Step) -> Option<&'v mut Value> {
    match (untagged(node), step) {
        (Value::Mapping(m), Step::Key(k)) => {
            m.iter_mut().find(|(key, _)| key_is(key, k)).map(|(_, v)| v)
        }
        (Value::Sequence(s), Step::Index(i)) => s.get_mut(*i),
        _ => None,
    }
}

/// A value under its YAML tag (`!tag value`), where it has one.
fn untagged(node: &mut Value) -> &mut Value {
    match node {
        Value::Tagged(t) => untagged(&mut t.value),
        other => other,
    }
}

/// The mapping key that a path names `k` (the path shows numbers and booleans as text).
fn key_is(key: &Value, k: &str) -> bool {
    match key {
        Value::String(s) => s == k,
        Value::Number(n) => n.to_string() == k,
        Value::Bool(b) => b.to_string() == k,
        _ => false,
    }
}

/// A path as the problems show it: `server.per_ip_overrides[0].network`.
fn show(path: &[Step]) -> String {
    let mut s = String::new();
    for step in path {
        match step {
            Step::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Step::Index(i) => {
                s.push('[');
                s.push_str(&i.to_string());
                s.push(']');
            }
        }
    }
    s
}

/// The semantic `problem` is about the key at `path`, or one inside or around it, or names it.
fn touches(problem: &str, path: &str) -> bool {
    let within = |outer: &str, inner: &str| {
        inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
    };
    let key = problem.split(": ").next().unwrap_or("");
    within(path, key)
        || within(key, path)
        || problem.match_indices(path).any(|(i, _)| {
            let after = problem[i + path.len()..].chars().next();
            !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn problems(text: &str, toml: bool) -> Vec<String> {
        read(text, toml).unwrap_err()
    }

    #[test]
    fn every_key_that_cannot_be_read_is_reported_at_once() {
        let p = problems(
            "server:\n  port: 99999\n  max_connections: lots\n  bogus: 1\n  read_timeout: 0\n\
             routing:\n  strategy: random\n",
            false,
        );
        assert_eq!(p.len(), 5, "{p:#?}");
        assert!(p[0].starts_with("server.port: invalid value: integer `99999`"));
        assert!(p[1].starts_with("server.max_connections: invalid type: string \"lots\""));
        assert!(p[2].starts_with("server.bogus: unknown field, expected one of `host`"));
        assert!(p[3].starts_with("routing.strategy: unknown variant `random`"));
        // The semantic checks ran on the rest.
        assert!(p[4].starts_with("server.read_timeout: 0 is not"), "{p:#?}");
    }

    #[test]
    fn toml_reports_them_the_same_way() {
        let p = problems(
            "[server]\nport = \"http\"\nbogus = 1\n[routing]\nconnect_timeout = -1\n",
            true,
        );
        assert_eq!(p.len(), 3, "{p:#?}");
        assert!(p[0].starts_with("server.port: invalid type: string \"http\""));
        assert!(p[1].starts_with("server.bogus: unknown field"));
        assert!(p[2].starts_with("routing.connect_timeout: "), "{p:#?}");
    }

    #[test]
    fn list_elements_keep_their_numbers() {
        // Elements 0 and 2 cannot be read: the semantic check, which sees the three others as
        // 0, 1 and 2, names the last one 4.
        let p = problems(
            "service_discovery:\n  static:\n    endpoints:\n      default:\n        \
             - weight: 1\n        - url: http://127.0.0.1:9001/mcp\n        - weight: 2\n        \
             - url: http://127.0.0.1:9002/mcp\n          weight: many\n        \
             - url: ftp://127.0.0.1/mcp\n",
            false,
        );
        assert_eq!(
            p.iter()
                .map(|p| p.split(':').next().unwrap())
                .collect::<Vec<_>>(),
            [
                "service_discovery.static.endpoints.default[0]",
                "service_discovery.static.endpoints.default[2]",
                "service_discovery.static.endpoints.default[3].weight",
                "service_discovery.static.endpoints.default[4].url",
            ],
            "{p:#?}"
        );
        assert!(p[0].ends_with("missing field `url`"), "{p:#?}");
    }

    #[test]
    fn a_check_about_a_key_that_could_not_be_read_is_not_reported() {
        // The port that could not be read would be 8080 (the default), which the admin port
        // here is too: no problem of the author's.
        let p = problems("server:\n  port: http\n  metrics_port: 8080\n", false);
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(p[0].starts_with("server.port: invalid type"));
        // Nor is the field a list element then lacks: it was reported as it was.
        let p = problems(
            "server:\n  per_ip_overrides:\n    - network: 10.0.0.0/8\n      \
             max_connections_per_ip: x\n",
            false,
        );
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(p[0].starts_with("server.per_ip_overrides[0].max_connections_per_ip: invalid"));
        // A list whose only element could not be read is not reported as empty.
        let p = problems(
            "service_discovery:\n  static:\n    endpoints:\n      tools:\n        - weight: 1\n",
            false,
        );
        assert_eq!(p.len(), 1, "{p:#?}");
    }

    #[test]
    fn syntax_errors_and_documents_that_are_not_mappings() {
        let p = problems("server:\n  port: [1\n", false);
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(p[0].contains("line"), "{p:#?}");
        let p = problems("[server\n", true);
        assert_eq!(p.len(), 1, "{p:#?}");
        let p = problems("- 1\n- 2\n", false);
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(p[0].starts_with("invalid type: sequence"), "{p:#?}");
        assert!(read("# nothing set\n", false).is_ok());
        assert!(read("", true).is_ok());
    }

    #[test]
    fn yaml_anchors_and_merge_keys_repeat_settings() {
        let c = read(
            "service_discovery:\n  static:\n    endpoints:\n      default:\n        \
             - &first {url: \"http://10.0.0.1:9000/mcp\", weight: 3}\n        \
             - <<: *first\n          url: http://10.0.0.2:9000/mcp\n",
            false,
        )
        .unwrap();
        let eps = &c.service_discovery.static_.endpoints["default"];
        assert_eq!(
            eps.iter()
                .map(|e| (e.url.as_str(), e.weight))
                .collect::<Vec<_>>(),
            [
                ("http://10.0.0.1:9000/mcp", 3),
                ("http://10.0.0.2:9000/mcp", 3)
            ]
        );
        let p = problems("routing:\n  <<: 5\n", false);
        assert_eq!(p.len(), 1, "{p:#?}");
    }

    #[test]
    fn namespaces_that_yaml_reads_as_numbers_are_names() {
        let c = read(
            "service_discovery:\n  static:\n    endpoints:\n      default:\n        \
             - url: builtin:echo\n      2024:\n        - url: builtin:echo\n",
            false,
        )
        .unwrap();
        let names: Vec<&str> = c
            .service_discovery
            .static_
            .endpoints
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(names, ["2024", "default"]);
    }

    #[test]
    fn a_document_of_errors_is_bounded() {
        let text: String = (0..200).map(|i| format!("bogus{i}: 1\n")).collect();
        assert_eq!(problems(&text, false).len(), MAX_PROBLEMS);
        // Keys that cannot be read and values that are not valid, together (found by the
        // configuration fuzz target: 40 of each gave 80).
        let mut text: String = (0..40).map(|i| format!("bogus{i}: 1\n")).collect();
        text.push_str("service_discovery:\n  static:\n    endpoints:\n      default:\n");
        text.extend((0..40).map(|i| format!("        - url: nowhere{i}\n")));
        assert_eq!(problems(&text, false).len(), MAX_PROBLEMS);
    }
}
