//! Text that agents send, made safe to show: no control characters and no invisible
//! formatting (bidirectional overrides, zero-width characters) that could make one
//! agent's name look like another's or reorder the rest of a line.

/// `s` without control or invisible formatting characters, at most `max` characters.
pub fn printable(s: &str, max: usize) -> String {
    s.chars()
        .filter(|&c| !c.is_control() && !is_invisible_format(c))
        .take(max)
        .collect()
}

fn is_invisible_format(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{2069}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_invisible_formatting_go() {
        assert_eq!(printable("nas\u{202E}gpj.exe", 64), "nasgpj.exe");
        assert_eq!(printable("a\u{200B}b\u{2066}c\u{FEFF}", 64), "abc");
        assert_eq!(printable("line\nbreak\x1b[31m", 64), "linebreak[31m");
        assert_eq!(printable("ünïcødé 名前", 64), "ünïcødé 名前");
        assert_eq!(printable("abcdef", 3), "abc");
    }
}
