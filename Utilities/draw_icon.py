"""Draw the extension icon (128x128 PNG): a stylised axial CT slice with colour-coded lymph nodes.

Run from the repository root: `python Utilities/draw_icon.py`. Writes LymphNodeClassifier.png and
LymphNodeClassifier/Resources/Icons/LymphNodeClassifier.png (the same image). Needs Pillow.
"""

from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZE = 128
SCALE = 4  # draw at 4x and downsample for smooth edges
ROOT = Path(__file__).resolve().parents[1]
TARGETS = [ROOT / "LymphNodeClassifier.png", ROOT / "LymphNodeClassifier" / "Resources" / "Icons" / "LymphNodeClassifier.png"]


def _box(cx, cy, rx, ry):
    return [SCALE * (cx - rx), SCALE * (cy - ry), SCALE * (cx + rx), SCALE * (cy + ry)]


def draw() -> Image.Image:
    big = SIZE * SCALE
    background = (18, 24, 38, 255)
    anatomy = Image.new("RGBA", (big, big), background)
    draw = ImageDraw.Draw(anatomy)

    # Body outline: skin/fat ring, then soft tissue.
    draw.ellipse(_box(64, 66, 56, 44), fill=(92, 92, 96, 255))
    draw.ellipse(_box(64, 66, 51, 39), fill=(150, 150, 154, 255))
    # Paraspinal muscles and the vertebral body (bright bone) at the back.
    draw.ellipse(_box(64, 93, 22, 12), fill=(128, 128, 132, 255))
    draw.ellipse(_box(64, 86, 11, 10), fill=(238, 238, 232, 255))
    draw.ellipse(_box(64, 86, 7, 6), fill=(200, 200, 192, 255))
    # Aorta (contrast) and vena cava in front of the spine; kidneys on both sides.
    draw.ellipse(_box(70, 71, 6, 6), fill=(226, 226, 226, 255))
    draw.ellipse(_box(55, 71, 6, 5), fill=(200, 200, 204, 255))
    draw.ellipse(_box(36, 80, 9, 12), fill=(176, 176, 180, 255))
    draw.ellipse(_box(92, 80, 9, 12), fill=(176, 176, 180, 255))
    # Bowel gas, for texture.
    for cx, cy, r in [(46, 48, 5), (80, 44, 6), (62, 38, 4), (92, 57, 4)]:
        draw.ellipse(_box(cx, cy, r, r), fill=(40, 40, 44, 255))

    # Soften the anatomy a little (CT look), then cut it to a dark rounded tile like a slice view.
    anatomy = anatomy.filter(ImageFilter.GaussianBlur(radius=0.7 * SCALE))
    tile = Image.new("L", (big, big), 0)
    ImageDraw.Draw(tile).rounded_rectangle([0, 0, big - 1, big - 1], radius=22 * SCALE, fill=255)
    image = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    image.paste(anatomy, (0, 0), tile)
    draw = ImageDraw.Draw(image)

    # Lymph nodes colour-coded by metastasis probability (green benign -> red metastatic).
    for cx, cy, r, colour in [(80, 63, 7.5, (228, 40, 36)), (47, 62, 6, (245, 200, 30)), (63, 58, 5, (60, 200, 90))]:
        draw.ellipse(_box(cx, cy, r + 1.6, r + 1.6), fill=(255, 255, 255, 255))
        draw.ellipse(_box(cx, cy, r, r), fill=colour + (255,))

    return image.resize((SIZE, SIZE), Image.LANCZOS)


def main() -> None:
    icon = draw()
    for target in TARGETS:
        target.parent.mkdir(parents=True, exist_ok=True)
        icon.save(target, format="PNG", optimize=True)
        print(f"wrote {target}")


if __name__ == "__main__":
    main()
