//! Block I/O traces: the CloudPhysics format (`version,time,op,size,lbn`, time in seconds, op
//! `28` read / `2a` write, lbn in 512-byte sectors) and a generic CSV
//! (`timestamp_s,volume,op,offset,size`, op `R` or `W`, offset and size in bytes).
//!
//! A malformed line is an error naming the file, the line and the field; nothing is guessed.

use std::path::Path;

/// One request of a trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Access {
    /// Seconds since an arbitrary origin (non-decreasing within a trace).
    pub t: f64,
    /// Index into [`Trace::volumes`].
    pub volume: u32,
    pub write: bool,
    pub offset: u64,
    pub size: u32,
}

#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// Volume names in order of first appearance.
    pub volumes: Vec<String>,
    pub accesses: Vec<Access>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    CloudPhysics,
    Csv,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cloudphysics" => Ok(Format::CloudPhysics),
            "csv" => Ok(Format::Csv),
            other => Err(format!(
                "unknown trace format '{other}' (expected cloudphysics or csv)"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("{file}: {source}")]
    Io {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}: field '{field}': {message}")]
    Field {
        file: String,
        line: usize,
        field: &'static str,
        message: String,
    },
    #[error("{file}: the trace has no requests")]
    Empty { file: String },
}

/// Reads a whole trace file.
pub fn read(path: &Path, format: Format) -> Result<Trace, TraceError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io {
        file: file.clone(),
        source,
    })?;
    parse(&text, &file, format)
}

/// Parses trace text; `file` names it in errors.
pub fn parse(text: &str, file: &str, format: Format) -> Result<Trace, TraceError> {
    let mut trace = Trace::default();
    let mut last_t = f64::NEG_INFINITY;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = l.split(',').map(str::trim).collect();
        let err = |field: &'static str, message: String| TraceError::Field {
            file: file.to_string(),
            line,
            field,
            message,
        };
        let access = match format {
            Format::CloudPhysics => {
                if line == 1 && fields.first() == Some(&"version") {
                    continue;
                }
                let [_, time, op, size, lbn] = fields[..] else {
                    return Err(err(
                        "line",
                        format!(
                            "expected 5 fields (version,time,op,size,lbn), got {}",
                            fields.len()
                        ),
                    ));
                };
                let write = match op.to_ascii_lowercase().as_str() {
                    "28" => false,
                    "2a" => true,
                    other => {
                        return Err(err(
                            "op",
                            format!("'{other}' is not 28 (read) or 2a (write)"),
                        ));
                    }
                };
                let lbn: u64 = lbn
                    .parse()
                    .map_err(|_| err("lbn", format!("'{lbn}' is not a sector number")))?;
                Access {
                    t: parse_time(time).map_err(|m| err("time", m))?,
                    volume: volume_index(&mut trace.volumes, "disk"),
                    write,
                    offset: lbn
                        .checked_mul(512)
                        .ok_or_else(|| err("lbn", format!("{lbn} is past the largest disk")))?,
                    size: parse_size(size).map_err(|m| err("size", m))?,
                }
            }
            Format::Csv => {
                if line == 1 && fields.first() == Some(&"timestamp_s") {
                    continue;
                }
                let [time, volume, op, offset, size] = fields[..] else {
                    return Err(err(
                        "line",
                        format!(
                            "expected 5 fields (timestamp_s,volume,op,offset,size), got {}",
                            fields.len()
                        ),
                    ));
                };
                if volume.is_empty() {
                    return Err(err("volume", "empty volume name".into()));
                }
                let write = match op {
                    "R" | "r" => false,
                    "W" | "w" => true,
                    other => return Err(err("op", format!("'{other}' is not R or W"))),
                };
                Access {
                    t: parse_time(time).map_err(|m| err("timestamp_s", m))?,
                    volume: volume_index(&mut trace.volumes, volume),
                    write,
                    offset: offset
                        .parse()
                        .map_err(|_| err("offset", format!("'{offset}' is not a byte offset")))?,
                    size: parse_size(size).map_err(|m| err("size", m))?,
                }
            }
        };
        if access.t < last_t {
            return Err(TraceError::Field {
                file: file.to_string(),
                line,
                field: if format == Format::Csv {
                    "timestamp_s"
                } else {
                    "time"
                },
                message: format!(
                    "time goes backwards ({} after {last_t}); traces must be in time order",
                    access.t
                ),
            });
        }
        last_t = access.t;
        trace.accesses.push(access);
    }
    if trace.accesses.is_empty() {
        return Err(TraceError::Empty {
            file: file.to_string(),
        });
    }
    Ok(trace)
}

fn parse_time(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err(format!("'{s}' is not a time in seconds (a number >= 0)")),
    }
}

fn parse_size(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("'{s}' is not a request size in bytes (1 to 4 GiB)")),
    }
}

fn volume_index(volumes: &mut Vec<String>, name: &str) -> u32 {
    match volumes.iter().position(|v| v == name) {
        Some(i) => i as u32,
        None => {
            volumes.push(name.to_string());
            (volumes.len() - 1) as u32
        }
    }
}

/// Writes a trace in the generic CSV format.
pub fn to_csv(trace: &Trace) -> String {
    let mut out = String::from("timestamp_s,volume,op,offset,size\n");
    for a in &trace.accesses {
        out.push_str(&format!(
            "{:.3},{},{},{},{}\n",
            a.t,
            trace.volumes[a.volume as usize],
            if a.write { 'W' } else { 'R' },
            a.offset,
            a.size
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_parse() {
        let cp = "version,time,op,size,lbn\n1,100,2a,512,8\n1,101,28,4096,16\n";
        let t = parse(cp, "cp.csv", Format::CloudPhysics).expect("cloudphysics");
        assert_eq!(t.accesses.len(), 2);
        assert_eq!(
            t.accesses[0],
            Access {
                t: 100.0,
                volume: 0,
                write: true,
                offset: 4096,
                size: 512
            }
        );
        assert!(!t.accesses[1].write);
        let csv = "timestamp_s,volume,op,offset,size\n0.5,a,R,0,4096\n1,b,W,8192,512\n2,a,w,0,1\n";
        let t = parse(csv, "g.csv", Format::Csv).expect("csv");
        assert_eq!(t.volumes, vec!["a", "b"]);
        assert_eq!(t.accesses[2].volume, 0);
        let again = parse(&to_csv(&t), "again.csv", Format::Csv).expect("round trip");
        assert_eq!(again.accesses, t.accesses);
    }

    #[test]
    fn malformed_lines_name_file_line_and_field() {
        let cases = [
            ("1,100,2a,512\n", Format::CloudPhysics, 1, "line"),
            ("1,100,2b,512,8\n", Format::CloudPhysics, 1, "op"),
            (
                "1,100,2a,512,8\n1,x,2a,512,8\n",
                Format::CloudPhysics,
                2,
                "time",
            ),
            ("1,100,2a,0,8\n", Format::CloudPhysics, 1, "size"),
            ("1,100,2a,512,-3\n", Format::CloudPhysics, 1, "lbn"),
            (
                "1,100,2a,512,8\n1,99,2a,512,8\n",
                Format::CloudPhysics,
                2,
                "time",
            ),
            ("0,a,X,0,1\n", Format::Csv, 1, "op"),
            ("0,a,R,zz,1\n", Format::Csv, 1, "offset"),
            ("0,,R,0,1\n", Format::Csv, 1, "volume"),
            ("-1,a,R,0,1\n", Format::Csv, 1, "timestamp_s"),
        ];
        for (text, format, want_line, want_field) in cases {
            match parse(text, "t.csv", format) {
                Err(TraceError::Field {
                    file, line, field, ..
                }) => {
                    assert_eq!(
                        (file.as_str(), line, field),
                        ("t.csv", want_line, want_field),
                        "{text}"
                    );
                }
                other => panic!("{text:?}: expected a field error, got {other:?}"),
            }
        }
        assert!(matches!(
            parse("version,time,op,size,lbn\n", "e.csv", Format::CloudPhysics),
            Err(TraceError::Empty { .. })
        ));
    }
}
