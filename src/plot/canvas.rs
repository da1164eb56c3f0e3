//! A small RGB raster: anti-aliased strokes and discs, rectangles, text from a pre-rasterized
//! font, and PNG encoding. Everything the charts need and nothing else; no system font or
//! library is involved, so a chart renders the same on any machine.
//!
//! Text uses `noto-sans-mono-bitmap` (Noto Sans Mono rasterized at build time, with 8-bit
//! coverage; crate under MIT, font under the SIL Open Font License). Characters outside Basic
//! Latin are drawn as `?`.

use std::io::Write;

use noto_sans_mono_bitmap::{get_raster, get_raster_width, FontWeight, RasterHeight};

pub type Rgb = [u8; 3];
pub type Point = (f64, f64);

/// An axis-aligned rectangle in pixels: `x0 <= x < x1`, `y0 <= y < y1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    pub x0: f64,
    pub y0: f64,
    pub x1: f64,
    pub y1: f64,
}

impl Rect {
    pub fn width(&self) -> f64 {
        self.x1 - self.x0
    }

    pub fn height(&self) -> f64 {
        self.y1 - self.y0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Font {
    /// Tick labels, axis labels, legend: regular, 16 px line height.
    Small,
    /// Titles: bold, 20 px line height.
    Title,
}

impl Font {
    fn weight_height(self) -> (FontWeight, RasterHeight) {
        match self {
            Font::Small => (FontWeight::Regular, RasterHeight::Size16),
            Font::Title => (FontWeight::Bold, RasterHeight::Size20),
        }
    }

    /// Advance of one character (the font is monospaced).
    pub fn char_width(self) -> f64 {
        let (w, h) = self.weight_height();
        get_raster_width(w, h) as f64
    }

    pub fn height(self) -> f64 {
        self.weight_height().1.val() as f64
    }

    pub fn text_width(self, text: &str) -> f64 {
        text.chars().count() as f64 * self.char_width()
    }
}

/// Where a text's anchor point lies on the text's box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Start,
    Center,
    End,
}

impl Align {
    fn offset(self, extent: f64) -> f64 {
        match self {
            Align::Start => 0.0,
            Align::Center => extent / 2.0,
            Align::End => extent,
        }
    }
}

pub struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<Rgb>,
    clip: Option<Rect>,
}

impl Canvas {
    pub fn new(width: usize, height: usize, background: Rgb) -> Self {
        Self { width, height, pixels: vec![background; width * height], clip: None }
    }

    /// Restrict drawing to `clip` (None: the whole canvas).
    pub fn set_clip(&mut self, clip: Option<Rect>) {
        self.clip = clip;
    }

    fn inside(&self, x: i64, y: i64) -> bool {
        if x < 0 || y < 0 || x as usize >= self.width || y as usize >= self.height {
            return false;
        }
        match self.clip {
            Some(r) => (x as f64) >= r.x0.floor() && (x as f64) < r.x1.ceil() && (y as f64) >= r.y0.floor() && (y as f64) < r.y1.ceil(),
            None => true,
        }
    }

    /// Mix `color` into pixel (x, y) with opacity `alpha` in [0, 1].
    fn blend(&mut self, x: i64, y: i64, color: Rgb, alpha: f64) {
        if alpha <= 0.0 || !self.inside(x, y) {
            return;
        }
        let a = alpha.min(1.0);
        let p = &mut self.pixels[y as usize * self.width + x as usize];
        for (c, &target) in p.iter_mut().zip(&color) {
            *c = (*c as f64 * (1.0 - a) + target as f64 * a).round() as u8;
        }
    }

    /// Fill the pixels whose centres lie in `r`.
    pub fn fill_rect(&mut self, r: Rect, color: Rgb) {
        let (x0, x1) = (r.x0.round() as i64, r.x1.round() as i64);
        let (y0, y1) = (r.y0.round() as i64, r.y1.round() as i64);
        for y in y0.min(y1)..y0.max(y1) {
            for x in x0.min(x1)..x0.max(x1) {
                self.blend(x, y, color, 1.0);
            }
        }
    }

    /// A one-pixel horizontal or vertical hairline, snapped to the pixel grid (axes, grid, ticks).
    pub fn hairline(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), color: Rgb) {
        let (x0, y0, x1, y1) = (x0.floor() as i64, y0.floor() as i64, x1.floor() as i64, y1.floor() as i64);
        for y in y0.min(y1)..=y0.max(y1) {
            for x in x0.min(x1)..=x0.max(x1) {
                self.blend(x, y, color, 1.0);
            }
        }
    }

    /// Stroke the segments with an anti-aliased pen of `width` pixels. Coverage is the maximum
    /// over the segments, not a sum, so joints and overlaps of one stroke are not darker.
    pub fn stroke(&mut self, segments: &[(Point, Point)], width: f64, color: Rgb) {
        let half = width / 2.0;
        let mut coverage: std::collections::HashMap<(i64, i64), f64> = Default::default();
        for &((ax, ay), (bx, by)) in segments {
            let (xmin, xmax) = ((ax.min(bx) - half - 1.0).floor() as i64, (ax.max(bx) + half + 1.0).ceil() as i64);
            let (ymin, ymax) = ((ay.min(by) - half - 1.0).floor() as i64, (ay.max(by) + half + 1.0).ceil() as i64);
            let (dx, dy) = (bx - ax, by - ay);
            let len2 = dx * dx + dy * dy;
            for y in ymin.max(-1)..=ymax.min(self.height as i64) {
                for x in xmin.max(-1)..=xmax.min(self.width as i64) {
                    let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
                    let t = if len2 > 0.0 { (((px - ax) * dx + (py - ay) * dy) / len2).clamp(0.0, 1.0) } else { 0.0 };
                    let d = ((px - ax - t * dx).powi(2) + (py - ay - t * dy).powi(2)).sqrt();
                    let c = (half + 0.5 - d).clamp(0.0, 1.0);
                    if c > 0.0 {
                        let e = coverage.entry((x, y)).or_insert(0.0);
                        *e = e.max(c);
                    }
                }
            }
        }
        for ((x, y), c) in coverage {
            self.blend(x, y, color, c);
        }
    }

    /// Stroke a polyline; `dash` is (on, off) lengths in pixels. Points that are not finite
    /// break the line.
    pub fn polyline(&mut self, points: &[(f64, f64)], width: f64, color: Rgb, dash: Option<(f64, f64)>) {
        let mut segments = Vec::new();
        let mut phase = 0.0; // distance travelled within the current dash period
        for pair in points.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if ![a.0, a.1, b.0, b.1].iter().all(|v| v.is_finite()) {
                continue;
            }
            let Some((on, off)) = dash else {
                segments.push((a, b));
                continue;
            };
            let len = ((b.0 - a.0).powi(2) + (b.1 - a.1).powi(2)).sqrt();
            let at = |s: f64| (a.0 + (b.0 - a.0) * s / len, a.1 + (b.1 - a.1) * s / len);
            let mut s = 0.0;
            while s < len {
                let period_left = on + off - phase;
                if phase < on {
                    let end = (s + on - phase).min(len);
                    segments.push((at(s), at(end)));
                    phase += end - s;
                    s = end;
                } else {
                    let end = (s + period_left).min(len);
                    phase += end - s;
                    s = end;
                }
                if phase >= on + off {
                    phase = 0.0;
                }
            }
        }
        self.stroke(&segments, width, color);
    }

    /// A filled anti-aliased disc.
    pub fn disc(&mut self, (cx, cy): (f64, f64), radius: f64, color: Rgb) {
        if !(cx.is_finite() && cy.is_finite()) {
            return;
        }
        for y in (cy - radius - 1.0).floor() as i64..=(cy + radius + 1.0).ceil() as i64 {
            for x in (cx - radius - 1.0).floor() as i64..=(cx + radius + 1.0).ceil() as i64 {
                let d = ((x as f64 + 0.5 - cx).powi(2) + (y as f64 + 0.5 - cy).powi(2)).sqrt();
                self.blend(x, y, color, (radius + 0.5 - d).clamp(0.0, 1.0));
            }
        }
    }

    /// Draw `text` with its box anchored at (x, y) as `h` and `v` say. `vertical` turns it a
    /// quarter turn counter-clockwise (reading upwards); `h` then aligns along the text's own
    /// direction (Start: the text's first character is at `y`) and `v` across it.
    #[allow(clippy::too_many_arguments)]
    pub fn text(&mut self, text: &str, (x, y): (f64, f64), font: Font, color: Rgb, h: Align, v: Align, vertical: bool) {
        let (weight, size) = font.weight_height();
        let (cw, ch) = (font.char_width(), font.height());
        let along = h.offset(font.text_width(text));
        let across = v.offset(ch);
        for (i, c) in text.chars().enumerate() {
            let Some(glyph) = get_raster(c, weight, size).or_else(|| get_raster('?', weight, size)) else { continue };
            for (gy, row) in glyph.rows().enumerate() {
                for (gx, &value) in row.iter().enumerate() {
                    if value == 0 {
                        continue;
                    }
                    // (u, w): position along and across the text, from its box's first corner.
                    let (u, w) = (i as f64 * cw + gx as f64 - along, gy as f64 - across);
                    let (px, py) = if vertical { (x + w, y - u - 1.0) } else { (x + u, y + w) };
                    self.blend(px.round() as i64, py.round() as i64, color, value as f64 / 255.0);
                }
            }
        }
    }

    /// The image as a PNG file (8-bit RGB, no filtering, zlib through flate2).
    pub fn to_png(&self) -> std::io::Result<Vec<u8>> {
        let mut raw = Vec::with_capacity((self.width * 3 + 1) * self.height);
        for row in self.pixels.chunks_exact(self.width.max(1)) {
            raw.push(0); // filter type None
            raw.extend(row.iter().flatten());
        }
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&raw)?;
        let idat = z.finish()?;
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut ihdr = Vec::with_capacity(13);
        ihdr.extend((self.width as u32).to_be_bytes());
        ihdr.extend((self.height as u32).to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]); // bit depth 8, colour type RGB, deflate, no filter, no interlace
        chunk(&mut png, b"IHDR", &ihdr);
        chunk(&mut png, b"IDAT", &idat);
        chunk(&mut png, b"IEND", &[]);
        Ok(png)
    }
}

fn chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    png.extend((data.len() as u32).to_be_bytes());
    png.extend(kind);
    png.extend(data);
    let mut crc = flate2::Crc::new();
    crc.update(kind);
    crc.update(data);
    png.extend(crc.sum().to_be_bytes());
}
