//! Reading what the services and peers produce: a delivered message's headers and
//! attachments, one series of Prometheus text.

use base64::Engine as _;

/// The top-level header `name` of the raw message `raw` (unfolded), if present.
pub fn header(raw: &str, name: &str) -> Option<String> {
    let head = raw.split("\r\n\r\n").next().unwrap_or_default();
    let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
    unfolded.split("\r\n").find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

/// The decoded bytes of the base64 part whose Content-Disposition names `filename`.
pub fn attachment_bytes(raw: &str, filename: &str) -> Vec<u8> {
    let at = raw
        .find(&format!("filename=\"{filename}\""))
        .unwrap_or_else(|| panic!("no attachment {filename} in:\n{raw}"));
    let part = &raw[at..];
    let body_start = part.find("\r\n\r\n").expect("part body") + 4;
    let body = &part[body_start..];
    let body = &body[..body.find("\r\n--").expect("part end")];
    let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64 attachment")
}

/// The value of the series `series` (name and labels as printed) in Prometheus text.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.rsplit_once(' ').filter(|(s, _)| *s == series))
        .and_then(|(_, v)| v.parse().ok())
}
