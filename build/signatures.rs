//! build.rs's reader of kernel signatures: each `extern "C" __global__` kernel of a
//! kernels/*.cu source, its parameters and how a launch passes each. Its own file so
//! that tests/core/kernels_build.rs can test it (a build script has no tests of its own).

/// How a launch passes one kernel parameter: the `ParamKind` variant of src/kernels.rs
/// that build.rs names in the generated table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Ptr,
    I32,
    U32,
    I64,
    U64,
    F32,
}

impl Kind {
    pub fn rust(self) -> &'static str {
        match self {
            Kind::Ptr => "Ptr",
            Kind::I32 => "I32",
            Kind::U32 => "U32",
            Kind::I64 => "I64",
            Kind::U64 => "U64",
            Kind::F32 => "F32",
        }
    }

    /// The letter emu_invoke.h's `fv_emu_kind` gives the C++ compiler's view of the
    /// same parameter (the static_assert that checks this parser).
    pub fn letter(self) -> char {
        match self {
            Kind::Ptr => 'p',
            Kind::I32 => 'i',
            Kind::U32 => 'u',
            Kind::I64 => 'l',
            Kind::U64 => 'U',
            Kind::F32 => 'f',
        }
    }
}

/// One kernel parameter: its name, its C type as written (less `__restrict__`), its kind.
pub struct Param {
    pub name: String,
    pub c_type: String,
    pub kind: Kind,
}

/// One `extern "C" __global__` kernel and the source (file stem) that defines it.
pub struct Kernel {
    pub name: String,
    pub source: String,
    pub params: Vec<Param>,
}

/// The scalar types a kernel may take by value: those [`Kind`] has a launch argument
/// for. `long` is 64-bit on the LP64 hosts and in the CUDA device code we build for.
fn scalar_kind(c_type: &str) -> Option<Kind> {
    Some(match c_type {
        "int" | "signed" | "signed int" => Kind::I32,
        "unsigned" | "unsigned int" => Kind::U32,
        "long" | "long long" | "signed long" | "signed long long" => Kind::I64,
        "unsigned long" | "unsigned long long" => Kind::U64,
        "float" => Kind::F32,
        _ => return None,
    })
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// `src` with its comments blanked (newlines kept, for line numbers; string literals
/// untouched): a kernel in a comment is no kernel, and a comment may say `__global__`.
fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut chars = src.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            match c {
                '\\' => out.extend(chars.next()),
                '"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match (c, chars.peek()) {
            ('/', Some('/')) => {
                while chars.peek().is_some_and(|&c| c != '\n') {
                    chars.next();
                }
            }
            ('/', Some('*')) => {
                chars.next();
                let mut last = ' ';
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                    }
                    if (last, c) == ('*', '/') {
                        break;
                    }
                    last = c;
                }
                out.push(' ');
            }
            _ => {
                in_string = c == '"';
                out.push(c);
            }
        }
    }
    out
}

/// Every `extern "C" __global__` kernel `src` defines, with its parameters. Strict: any
/// `__global__` this cannot read is an error naming its line (and the kernel, once its
/// name is known), so that no kernel is launched unchecked.
pub fn parse_kernels(src: &str, source: &str) -> Result<Vec<Kernel>, String> {
    let text = strip_comments(src);
    let mut kernels = Vec::new();
    for (at, word) in text.match_indices("__global__") {
        let end = at + word.len();
        let boundary = |c: Option<char>| !c.is_some_and(is_ident_char);
        if !boundary(text[..at].chars().next_back()) || !boundary(text[end..].chars().next()) {
            continue;
        }
        let line = text[..at].matches('\n').count() + 1;
        let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
        let kernel = if text[line_start..at].trim_start().starts_with('#') {
            Err("`__global__` in a macro: write kernels out, so that build.rs reads them".into())
        } else if !text[..at].trim_end().ends_with("extern \"C\"") {
            Err(
                "a `__global__` function that is not `extern \"C\"` (kernels are launched \
                 by their unmangled name)"
                    .into(),
            )
        } else {
            parse_kernel(&text[end..], source)
        };
        kernels.push(kernel.map_err(|e| format!("line {line}: {e}"))?);
    }
    Ok(kernels)
}

/// The kernel whose definition follows `__global__`: `void`, optionally
/// `__launch_bounds__(…)`, its name, its parameter list and its body.
fn parse_kernel(rest: &str, source: &str) -> Result<Kernel, String> {
    let mut rest = rest.trim_start();
    let mut returns_void = false;
    loop {
        if let Some(r) = keyword(rest, "void") {
            returns_void = true;
            rest = r;
        } else if let Some(r) = keyword(rest, "__launch_bounds__") {
            rest = skip_parenthesized(r).ok_or("unbalanced `__launch_bounds__(…)`")?;
        } else {
            break;
        }
        rest = rest.trim_start();
    }
    let name: String = rest.chars().take_while(|&c| is_ident_char(c)).collect();
    if name.is_empty() || !returns_void {
        return Err(
            "expected `void`, `__launch_bounds__(…)` and the kernel's name after \
                    `__global__`"
                .into(),
        );
    }
    let in_kernel = |e: String| format!("kernel {name}: {e}");
    let (list, after) = rest[name.len()..]
        .trim_start()
        .strip_prefix('(')
        .and_then(|r| r.split_once(')'))
        .ok_or_else(|| in_kernel("expected its parameter list in parentheses".into()))?;
    if !after.trim_start().starts_with('{') {
        return Err(in_kernel(
            "expected its body after the parameter list (declarations are not read)".into(),
        ));
    }
    Ok(Kernel {
        params: parse_params(list).map_err(in_kernel)?,
        source: source.to_string(),
        name,
    })
}

/// `rest` after the keyword `word`, if it starts with it.
fn keyword<'a>(rest: &'a str, word: &str) -> Option<&'a str> {
    rest.strip_prefix(word)
        .filter(|r| !r.starts_with(is_ident_char))
}

/// What follows the balanced parenthesized group `rest` starts with.
fn skip_parenthesized(rest: &str) -> Option<&str> {
    let rest = rest.trim_start().strip_prefix('(')?;
    let mut depth = 1;
    for (i, c) in rest.char_indices() {
        depth += match c {
            '(' => 1,
            ')' => -1,
            _ => 0,
        };
        if depth == 0 {
            return Some(&rest[i + 1..]);
        }
    }
    None
}

fn parse_params(list: &str) -> Result<Vec<Param>, String> {
    let list = list.trim();
    if list.is_empty() || list == "void" {
        return Ok(Vec::new());
    }
    list.split(',')
        .enumerate()
        .map(|(i, p)| {
            parse_param(p).map_err(|e| format!("parameter {} (`{}`): {e}", i + 1, p.trim()))
        })
        .collect()
}

/// One parameter: type words (`const`, `__restrict__` allowed), `*`s, then its name.
fn parse_param(p: &str) -> Result<Param, String> {
    if let Some(c) = p
        .chars()
        .find(|&c| !(is_ident_char(c) || c == '*' || c.is_whitespace()))
    {
        return Err(format!(
            "unexpected `{c}` (build.rs reads only `[const] type [*…] [__restrict__] name`)"
        ));
    }
    let spaced = p.replace('*', " * ");
    let mut words: Vec<&str> = spaced
        .split_whitespace()
        .filter(|w| !matches!(*w, "__restrict__" | "__restrict"))
        .collect();
    const NOT_NAMES: [&str; 11] = [
        "*", "const", "void", "int", "long", "short", "char", "signed", "unsigned", "float",
        "double",
    ];
    let name = words
        .pop()
        .filter(|w| !NOT_NAMES.contains(w))
        .ok_or("expected a type and a parameter name")?;
    let c_type = words.join(" ").replace(" *", "*");
    let base: Vec<&str> = words.iter().copied().filter(|w| *w != "const").collect();
    let stars = base.iter().filter(|w| **w == "*").count();
    let kind = if stars == 0 {
        scalar_kind(&base.join(" ")).ok_or_else(|| {
            format!(
                "type `{c_type}` cannot be passed (a pointer, int, unsigned, long, long long, \
                 unsigned long long or float can)"
            )
        })?
    } else if stars < base.len() && base[base.len() - stars..].iter().all(|w| *w == "*") {
        Kind::Ptr
    } else {
        return Err(format!("cannot read the type `{c_type}`"));
    };
    Ok(Param {
        name: name.to_string(),
        c_type,
        kind,
    })
}
