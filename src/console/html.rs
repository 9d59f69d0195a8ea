//! HTML building blocks: escaping (every value goes through [`esc`]), the page shell with the
//! navigation, and the depth chart as inline SVG. No templates engine: plain `format!`.

use std::fmt::Write;

/// Escape text for an HTML element or a quoted attribute.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encode a value for a query string.
pub fn url_enc(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The sections of the console, in navigation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Overview,
    Parked,
    Trace,
    Routes,
}

impl Section {
    const ALL: [Section; 4] = [
        Section::Overview,
        Section::Parked,
        Section::Trace,
        Section::Routes,
    ];

    fn path(self) -> &'static str {
        match self {
            Section::Overview => "/console/overview",
            Section::Parked => "/console/parked",
            Section::Trace => "/console/trace",
            Section::Routes => "/console/routes",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Section::Overview => "Overview",
            Section::Parked => "Parked",
            Section::Trace => "Trace",
            Section::Routes => "Routes",
        }
    }
}

/// A whole page: head (stylesheet, deferred script), navigation with the logout form,
/// `<main>` with the title and `body` (already escaped HTML).
pub fn page(title: &str, section: Option<Section>, csrf: Option<&str>, body: &str) -> String {
    let mut nav = String::new();
    if let Some(csrf) = csrf {
        nav.push_str("<header><nav aria-label=\"Console sections\"><ul>");
        for s in Section::ALL {
            let current = if Some(s) == section {
                " aria-current=\"page\""
            } else {
                ""
            };
            let _ = write!(
                nav,
                "<li><a href=\"{}\"{current}>{}</a></li>",
                s.path(),
                s.name()
            );
        }
        let _ = write!(
            nav,
            "</ul><form method=\"post\" action=\"/console/logout\" class=\"logout\">{}<button type=\"submit\">Log out</button></form></nav></header>",
            csrf_field(csrf)
        );
    }
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{title} · relay console</title>\
<link rel=\"stylesheet\" href=\"/console/assets/console.css\">\
<script src=\"/console/assets/console.js\" defer></script></head>\
<body><a class=\"skip\" href=\"#main\">Skip to content</a>{nav}\
<main id=\"main\" tabindex=\"-1\"><h1>{title}</h1>\n{body}</main></body></html>\n",
        title = esc(title),
    )
}

/// The hidden CSRF field every POST form carries.
pub fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        esc(csrf)
    )
}

/// A notice (`role=status`, read out by screen readers) or an error (`role=alert`).
pub fn notice(text: &str, error: bool) -> String {
    if error {
        format!("<p class=\"notice error\" role=\"alert\">{}</p>", esc(text))
    } else {
        format!("<p class=\"notice\" role=\"status\">{}</p>", esc(text))
    }
}

/// `12 s`, `4 min`, `3 h`, `2 d` since `then_ms`; `—` when unknown.
pub fn age(then_ms: Option<i64>, now_ms: i64) -> String {
    let Some(then) = then_ms else {
        return "—".into();
    };
    let secs = ((now_ms - then).max(0)) / 1000;
    match secs {
        0..=119 => format!("{secs} s"),
        120..=7199 => format!("{} min", secs / 60),
        7200..=172_799 => format!("{} h", secs / 3600),
        _ => format!("{} d", secs / 86_400),
    }
}

/// A time as RFC 3339 UTC in a `<time>` element.
pub fn time(ms: i64) -> String {
    let t = crate::admin::rfc3339(ms);
    format!(
        "<time datetime=\"{t}\">{}</time>",
        esc(&t.replace('T', " "))
    )
}

/// One series of the depth chart.
pub struct Series<'a> {
    pub name: &'a str,
    pub class: &'a str,
    /// (ms since the epoch, value), oldest first.
    pub points: Vec<(i64, u64)>,
}

/// Depth over the hour before `now_ms` as inline SVG (no script needed), with a text
/// summary for screen readers.
pub fn chart(series: &[Series], now_ms: i64) -> String {
    const W: f64 = 720.0;
    const H: f64 = 200.0;
    const HOUR_MS: f64 = 3_600_000.0;
    let recent = |at: i64| now_ms - at <= HOUR_MS as i64;
    let max = series
        .iter()
        .flat_map(|s| s.points.iter().filter(|p| recent(p.0)).map(|p| p.1))
        .max()
        .unwrap_or(0)
        .max(1);
    let mut svg = format!(
        "<svg class=\"chart\" viewBox=\"0 0 {W} {}\" role=\"img\" aria-labelledby=\"chart-title\" preserveAspectRatio=\"none\">\
<title id=\"chart-title\">Queue depth over the last hour (most {max})</title>\
<line class=\"axis\" x1=\"0\" y1=\"{H}\" x2=\"{W}\" y2=\"{H}\"/>\
<text x=\"4\" y=\"14\" class=\"label\">{max}</text><text x=\"4\" y=\"{}\" class=\"label\">0</text>\
<text x=\"{}\" y=\"{}\" class=\"label\" text-anchor=\"end\">now</text><text x=\"4\" y=\"{}\" class=\"label\">−60 min</text>",
        H + 20.0,
        H - 4.0,
        W - 4.0,
        H + 16.0,
        H + 16.0,
    );
    for s in series {
        let points: Vec<String> = s
            .points
            .iter()
            .filter(|(at, _)| recent(*at))
            .map(|(at, v)| {
                let x = W - ((now_ms - at) as f64 / HOUR_MS * W).clamp(0.0, W);
                let y = H - (*v as f64 / max as f64) * (H - 20.0);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        if let Some(last) = points.last() {
            let _ = write!(
                svg,
                "<polyline class=\"{class}\" points=\"{}\"><title>{}</title></polyline>",
                points.join(" "),
                esc(s.name),
                class = esc(s.class),
            );
            // The latest reading as a dot: visible even while the line has one point.
            if let Some((x, y)) = last.split_once(',') {
                let _ = write!(
                    svg,
                    "<circle class=\"{}\" cx=\"{x}\" cy=\"{y}\" r=\"4\"/>",
                    esc(s.class)
                );
            }
        }
    }
    svg.push_str("</svg>");
    let legend: Vec<String> = series
        .iter()
        .map(|s| {
            let last = s.points.last().map(|p| p.1).unwrap_or(0);
            format!(
                "<li><span class=\"swatch {}\"></span>{} (now {last})</li>",
                esc(s.class),
                esc(s.name)
            )
        })
        .collect();
    format!(
        "<figure>{svg}<figcaption><ul class=\"legend\">{}</ul></figcaption></figure>",
        legend.join("")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_every_character_that_could_leave_text_or_an_attribute() {
        assert_eq!(
            esc(r#"<script>alert('x')</script> & "q""#),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
        assert_eq!(esc("plain 003ABC é"), "plain 003ABC é");
        assert_eq!(esc(""), "");
    }

    #[test]
    fn a_page_escapes_its_title_and_carries_the_csrf_token_in_the_logout_form() {
        let html = page("<b>", Some(Section::Parked), Some("t\"k"), "<p>body</p>");
        assert!(html.contains("<title>&lt;b&gt; · relay console</title>"));
        assert!(html.contains("value=\"t&quot;k\""));
        assert!(html.contains("href=\"/console/parked\" aria-current=\"page\""));
        let anonymous = page("Log in", None, None, "");
        assert!(!anonymous.contains("logout"));
    }

    #[test]
    fn ages_read_like_a_person_would_say_them() {
        assert_eq!(age(None, 0), "—");
        assert_eq!(age(Some(0), 5_000), "5 s");
        assert_eq!(age(Some(0), 600_000), "10 min");
        assert_eq!(age(Some(0), 3 * 3_600_000), "3 h");
        assert_eq!(age(Some(0), 3 * 86_400_000), "3 d");
    }

    #[test]
    fn the_chart_draws_only_the_last_hour() {
        let now = 10_000_000;
        let svg = chart(
            &[Series {
                name: "waiting",
                class: "waiting",
                points: vec![(now - 4_000_000, 9), (now - 60_000, 2), (now, 4)],
            }],
            now,
        );
        assert!(svg.contains("<polyline class=\"waiting\""));
        assert_eq!(svg.matches(',').count(), 2, "two points: {svg}");
        assert!(svg.contains("(now 4)"));
    }
}
