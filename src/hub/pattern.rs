//! AMQP topic patterns: words separated by `.`, `*` matches exactly one
//! word, `#` matches zero or more. Parsed once per subscription.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Word {
    Exact(Box<str>),
    One,
    Many,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: Box<str>,
    words: Vec<Word>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("empty pattern")]
    Empty,
    #[error("pattern has an empty word (leading, trailing or double dot)")]
    EmptyWord,
    #[error("pattern has more than {0} words")]
    TooManyWords(usize),
    #[error("pattern is longer than {0} bytes")]
    TooLong(usize),
    #[error("word {0:?} mixes a wildcard with other characters")]
    MixedWildcard(String),
    #[error("word {0:?} has characters other than letters, digits, '-' and '_'")]
    BadCharacter(String),
}

/// Longest pattern accepted, in bytes.
pub const MAX_PATTERN_BYTES: usize = 255;

impl Pattern {
    pub fn parse(text: &str, max_words: usize) -> Result<Self, PatternError> {
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        if text.len() > MAX_PATTERN_BYTES {
            return Err(PatternError::TooLong(MAX_PATTERN_BYTES));
        }
        let mut words = Vec::new();
        for w in text.split('.') {
            if words.len() == max_words {
                return Err(PatternError::TooManyWords(max_words));
            }
            let word = match w {
                "" => return Err(PatternError::EmptyWord),
                "*" => Word::One,
                "#" => {
                    // "#.#" is the same as "#"; keeping one makes matching linear.
                    if words.last() == Some(&Word::Many) {
                        continue;
                    }
                    Word::Many
                }
                w if w.contains(['*', '#']) => return Err(PatternError::MixedWildcard(w.to_owned())),
                w if !w.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') => {
                    return Err(PatternError::BadCharacter(w.to_owned()));
                }
                w => Word::Exact(w.into()),
            };
            words.push(word);
        }
        Ok(Pattern {
            text: text.into(),
            words,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the topic (words split on `.`) matches.
    pub fn matches(&self, topic: &str) -> bool {
        let topic: Vec<&str> = topic.split('.').collect();
        self.matches_words(&topic)
    }

    pub fn matches_words(&self, topic: &[&str]) -> bool {
        // Iterative glob matching with backtracking to the last `#`: linear
        // in practice, and never recursive on hostile patterns.
        let (p, t) = (&self.words, topic);
        let (mut pi, mut ti) = (0, 0);
        let mut star: Option<(usize, usize)> = None;
        while ti < t.len() {
            match p.get(pi) {
                Some(Word::Many) => {
                    star = Some((pi, ti));
                    pi += 1;
                }
                Some(Word::One) => {
                    pi += 1;
                    ti += 1;
                }
                Some(Word::Exact(w)) if **w == *t[ti] => {
                    pi += 1;
                    ti += 1;
                }
                _ => match star {
                    Some((sp, st)) => {
                        pi = sp + 1;
                        ti = st + 1;
                        star = Some((sp, st + 1));
                    }
                    None => return false,
                },
            }
        }
        p[pi..].iter().all(|w| *w == Word::Many)
    }
}

/// One parsed word, borrowed: what the subscription index walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WordRef<'a> {
    Exact(&'a str),
    /// `*`
    One,
    /// `#` (consecutive ones already collapsed by the parser)
    Many,
}

impl Pattern {
    /// The parsed words, in order.
    pub fn words(&self) -> impl ExactSizeIterator<Item = WordRef<'_>> + '_ {
        self.words.iter().map(|w| match w {
            Word::Exact(w) => WordRef::Exact(w),
            Word::One => WordRef::One,
            Word::Many => WordRef::Many,
        })
    }

    /// Whether the pattern has a `*` or `#`; one without matches exactly
    /// the topic equal to its text.
    pub fn has_wildcard(&self) -> bool {
        self.words.iter().any(|w| !matches!(w, Word::Exact(_)))
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, t: &str) -> bool {
        Pattern::parse(p, 32).unwrap().matches(t)
    }

    #[test]
    fn star_matches_exactly_one_word() {
        assert!(m("product.price.*", "product.price.42"));
        assert!(!m("product.price.*", "product.price"));
        assert!(!m("product.price.*", "product.price.42.x"));
        assert!(m("product.*.42", "product.stock.42"));
        assert!(!m("product.*.42", "product.stock.420"));
    }

    #[test]
    fn hash_matches_zero_or_more_words() {
        assert!(m("product.#", "product.price.42"));
        assert!(m("product.#", "product"));
        assert!(m("#", "product.price.42"));
        assert!(m("#.42", "product.price.42"));
        assert!(!m("#.42", "product.price.43"));
        assert!(m("product.#.42", "product.42"));
        assert!(m("product.#.42", "product.a.b.42"));
        assert!(m("#.#", "a"));
        assert!(m("*.#", "a"));
        assert!(!m("*.*.#", "a"));
        assert!(m("#.price.#", "product.price.42"));
        assert!(!m("product.stock.#", "product.price.42"));
    }

    #[test]
    fn bad_patterns_are_refused_with_a_reason() {
        assert_eq!(Pattern::parse("", 32), Err(PatternError::Empty));
        assert_eq!(Pattern::parse("product..price", 32), Err(PatternError::EmptyWord));
        assert_eq!(Pattern::parse(".product", 32), Err(PatternError::EmptyWord));
        assert_eq!(
            Pattern::parse("product.pri*", 32),
            Err(PatternError::MixedWildcard("pri*".into()))
        );
        assert_eq!(
            Pattern::parse("product.pr ice", 32),
            Err(PatternError::BadCharacter("pr ice".into()))
        );
        let long = vec!["a"; 100].join(".");
        assert_eq!(Pattern::parse(&long, 32), Err(PatternError::TooManyWords(32)));
        let huge = vec!["a"; 10_000].join(".");
        assert_eq!(Pattern::parse(&huge, 32), Err(PatternError::TooLong(MAX_PATTERN_BYTES)));
    }

    #[test]
    fn hostile_pattern_matches_in_bounded_time() {
        let p = Pattern::parse(&["#", "a"].repeat(15).join("."), 32).unwrap();
        let topic = vec!["a"; 60].join(".") + ".b";
        assert!(!p.matches(&topic));
    }
}

#[cfg(test)]
mod properties {
    //! The parser never panics, and the matcher agrees with a plain
    //! recursive definition of AMQP topic matching.

    use super::*;
    use proptest::prelude::*;

    /// AMQP topic matching, written the obvious (exponential) way.
    fn reference(pattern: &[&str], topic: &[&str]) -> bool {
        match (pattern.first(), topic.first()) {
            (None, None) => true,
            (Some(&"#"), _) => {
                reference(&pattern[1..], topic) || (!topic.is_empty() && reference(pattern, &topic[1..]))
            }
            (Some(_), None) | (None, Some(_)) => false,
            (Some(&"*"), Some(_)) => reference(&pattern[1..], &topic[1..]),
            (Some(p), Some(t)) => p == t && reference(&pattern[1..], &topic[1..]),
        }
    }

    fn word() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_owned()),
            Just("b".to_owned()),
            Just("*".to_owned()),
            Just("#".to_owned())
        ]
    }

    proptest! {
        #![proptest_config(crate::testing::proptest_config())]

        #[test]
        fn pattern_parser_never_panics(text in ".{0,300}") {
            if let Ok(p) = Pattern::parse(&text, 32) {
                let _ = p.matches("product.price.42");
            }
        }

        #[test]
        fn matcher_agrees_with_the_reference(
            pattern in proptest::collection::vec(word(), 1..7),
            topic in proptest::collection::vec(prop_oneof![Just("a"), Just("b")], 1..8),
        ) {
            let text = pattern.join(".");
            let p = Pattern::parse(&text, 32).unwrap();
            let pw: Vec<&str> = pattern.iter().map(String::as_str).collect();
            prop_assert_eq!(p.matches_words(&topic), reference(&pw, &topic), "{} vs {:?}", text, topic);
        }
    }
}
