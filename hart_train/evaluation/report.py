"""Evaluation reports: one JSON file for machines and a one-page markdown file for people, with a
sheet of sample images and their prompts. Used by `hart-eval fid`, `hart-eval clip` and the demo.

    report.write_report(out_dir, "fid", Report(title, numbers, settings, samples))
      -> out_dir/fid.json, out_dir/fid.md, out_dir/fid_samples.png

Design decisions:
- Images are shown at a size a person can judge: small images are enlarged by a whole factor without
  smoothing (each pixel a sharp block, nothing invented), large ones reduced with Lanczos, into square
  cells of `CELL_PX`. Each image carries its prompt under it, wrapped; the full prompts are also listed
  in the markdown, as the sheet cuts long ones.
- `prompt_rows` draws several images per prompt, one prompt per row (the demo's sample grid).
- Text uses Pillow's built-in scalable font, so no font file has to be installed.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

CELL_PX = 256
_FONT_PX = 14
_PAD = 6
_MAX_CAPTION_LINES = 4


@dataclass
class Report:
    title: str
    numbers: dict  # the headline results, name -> value
    settings: dict  # how they were obtained, name -> value
    samples: list = field(default_factory=list)  # (PIL image, caption) pairs for the sample sheet
    samples_caption: str = ""
    extra: dict = field(default_factory=dict)  # JSON only (e.g. per-image scores)


def fit_image(img: Image.Image, px: int = CELL_PX) -> Image.Image:
    """`img` fitted into a px x px box: enlarged by a whole factor without smoothing, or reduced."""
    img = img.convert("RGB")
    side = max(img.size)
    if side <= px:
        k = px // side
        return img.resize((img.width * k, img.height * k), Image.Resampling.NEAREST) if k > 1 else img
    scale = px / side
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)


def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=_FONT_PX)


def wrap(text: str, font, width: int, max_lines: int = _MAX_CAPTION_LINES) -> list[str]:
    """`text` broken into lines no wider than `width` pixels; the last line ends with an ellipsis if cut."""
    lines, line = [], ""
    for word in text.split():
        while font.getlength(word) > width:  # a word wider than the cell is broken anywhere
            cut = next((i for i in range(len(word) - 1, 0, -1) if font.getlength(word[:i]) <= width), 1)
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "…"]
    return lines


def sample_sheet(samples: list, columns: int = 4, px: int = CELL_PX) -> Image.Image:
    """(image, caption) pairs as a grid of px-square cells, each caption wrapped under its image."""
    assert samples, "no samples to draw"
    font = _font()
    line_px = _FONT_PX + 3
    columns = min(columns, len(samples))
    captions = [wrap(caption, font, px - 2 * _PAD) for _, caption in samples]
    cell_h = px + 2 * _PAD + line_px * max(len(c) for c in captions)
    rows = (len(samples) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (px + _PAD) + _PAD, rows * cell_h + _PAD), "white")
    draw = ImageDraw.Draw(sheet)
    for i, ((img, _), lines) in enumerate(zip(samples, captions)):
        x0, y0 = _PAD + (i % columns) * (px + _PAD), _PAD + (i // columns) * cell_h
        img = fit_image(img, px)
        sheet.paste(img, (x0 + (px - img.width) // 2, y0 + (px - img.height) // 2))
        for j, line in enumerate(lines):
            draw.text((x0 + _PAD, y0 + px + _PAD + j * line_px), line, fill="black", font=font)
    return sheet


def prompt_rows(rows: list, px: int = CELL_PX) -> Image.Image:
    """(prompt, [images]) rows: each prompt wrapped above its row of px-square images."""
    assert rows, "no rows to draw"
    font = _font()
    line_px = _FONT_PX + 3
    columns = max(len(images) for _, images in rows)
    width = columns * (px + _PAD) + _PAD
    bands = [wrap(prompt, font, width - 2 * _PAD, max_lines=2) for prompt, _ in rows]
    heights = [len(lines) * line_px + _PAD + px + _PAD for lines in bands]
    sheet = Image.new("RGB", (width, sum(heights) + _PAD), "white")
    draw = ImageDraw.Draw(sheet)
    y = _PAD
    for (_, images), lines, height in zip(rows, bands, heights):
        for j, line in enumerate(lines):
            draw.text((_PAD, y + j * line_px), line, fill="black", font=font)
        top = y + len(lines) * line_px + _PAD
        for k, img in enumerate(images):
            img = fit_image(img, px)
            sheet.paste(img, (_PAD + k * (px + _PAD) + (px - img.width) // 2, top + (px - img.height) // 2))
        y += height
    return sheet


def _cell(value) -> str:
    if isinstance(value, float):
        value = round(value, 4)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(rep: Report, sheet_name: str | None) -> str:
    lines = [f"# {rep.title}", "", "| result | value |", "|---|---|"]
    lines += [f"| {_cell(k)} | **{_cell(v)}** |" for k, v in rep.numbers.items()]
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rep.settings.items()]
    if sheet_name:
        lines += ["", "## Samples", "", rep.samples_caption, "", f"![samples]({sheet_name})", ""]
        lines += [f"{i}. {_cell(caption)}" for i, (_, caption) in enumerate(rep.samples, start=1)]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, name: str, rep: Report) -> tuple[Path, Path]:
    """out_dir/<name>.json, out_dir/<name>.md and (with samples) out_dir/<name>_samples.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sheet_name = f"{name}_samples.png" if rep.samples else None
    if sheet_name:
        sample_sheet(rep.samples).save(out_dir / sheet_name)
    record = {"title": rep.title, "numbers": rep.numbers, "settings": rep.settings,
              "samples": [caption for _, caption in rep.samples], "sample_sheet": sheet_name,
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **rep.extra}
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(markdown(rep, sheet_name), encoding="utf-8")
    return json_path, md_path
