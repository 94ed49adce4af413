//! Untrusted text shown to a person: class names (from a checkpoint's index or a data
//! folder), tensor and file names. Printed raw, a name holding an escape sequence
//! would reach the terminal as a command (cursor moves, colours, a retitled window) or
//! forge a line of output; [`escape`] makes such characters visible instead.

use std::borrow::Cow;

/// Unicode's bidirectional controls: they reorder the text shown around them.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every control character (C0, DEL, C1: newline, tab and ESC included) and
/// bidirectional control written as Rust escapes (`\n`, `\u{1b}`); other text, quotes
/// and backslashes as they are. Borrowed when there is nothing to escape.
pub fn escape(s: &str) -> Cow<'_, str> {
    let needs = |c: char| c.is_control() || is_bidi_control(c);
    if !s.chars().any(needs) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if needs(c) {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// An error message as printed: escaped as [`escape`] does, and at most about
/// [`MAX_LINE`] characters — a message that quotes hostile input (a million-entry list
/// from a file, a config line of nested brackets) keeps its start and end, with how
/// much was left out between them.
pub fn error_line(msg: &str) -> String {
    let msg = escape(msg);
    let n = msg.chars().count();
    if n <= MAX_LINE {
        return msg.into_owned();
    }
    let (head, tail) = (MAX_LINE * 3 / 4, MAX_LINE / 4);
    let start: String = msg.chars().take(head).collect();
    let end: String = msg.chars().skip(n - tail).collect();
    format!(
        "{start} … ({} characters left out) … {end}",
        n - head - tail
    )
}

/// The longest error line printed whole.
pub const MAX_LINE: usize = 2000;

/// A path, escaped as [`escape`] does (bytes that are not UTF-8 shown as U+FFFD).
pub fn path(p: &std::path::Path) -> String {
    escape(&p.to_string_lossy()).into_owned()
}

/// Names joined by `", "`, each escaped.
pub fn join(names: &[String]) -> String {
    names
        .iter()
        .map(|n| escape(n))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_and_bidi_characters_are_escaped_the_rest_kept() {
        assert_eq!(escape("cat"), "cat");
        assert!(matches!(escape("chat noir \"é\" \\"), Cow::Borrowed(_)));
        assert_eq!(escape("a\u{1b}[31mred"), "a\\u{1b}[31mred");
        assert_eq!(escape("two\nlines\t\r"), "two\\nlines\\t\\r");
        assert_eq!(escape("\u{7f}\u{9b}"), "\\u{7f}\\u{9b}");
        assert_eq!(escape("abc\u{202e}def"), "abc\\u{202e}def");
        assert_eq!(join(&["a\u{7}".into(), "b".into()]), "a\\u{7}, b");
    }
}
