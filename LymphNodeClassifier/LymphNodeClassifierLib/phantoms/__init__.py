"""Abdominal CT phantoms with benign and metastatic lymph nodes: the project's training and test data.

The phantom is continuous geometry in a patient frame (mm, LPS axes: +x patient left, +y
posterior, +z superior; origin near the front of L2/L3 on the midline). Each study places the
patient on the table (a translation and a small rotation about S-I) and renders the geometry onto
its scanner grid (origin, spacing, direction; optionally gantry-tilted) by evaluating tissues at
voxel centres, with z-supersampling for slices thicker than `supersample_step_mm` (partial-volume
averaging over the slice thickness). Then in-plane blur (the scanner's PSF) and spatially
correlated Gaussian noise are applied, and the result is rounded to int16 HU.

Anatomy (HU ranges in `PhantomConfig`): air, table, skin, subcutaneous fat, abdominal wall muscles
(rectus with linea alba, obliques), paraspinal and quadratus lumborum muscles, psoas (growing
inferiorly), lumbar vertebrae (cortical rim, cancellous core, discs, canal, lamina, spinous and
transverse processes), aorta (contrast, wall, optional calcified plaques), IVC, SMA/SMV with
mesenteric branches, renal arteries and veins (the left renal vein passes between aorta and SMA),
kidneys (cortex, medulla, sinus fat, pelvis), the lower liver and spleen, gallbladder, colon
(feces with gas bubbles, gas caps) and small-bowel loops (fluid, gas, air-fluid levels, optional
oral contrast, collapsed loops), visceral fat everywhere else inside the abdominal wall.

Lymph nodes (2-12 per patient) sit in retroperitoneal (para-aortic, aortocaval, paracaval,
pre-aortic, retrocaval) or mesenteric fat, never touching organs or each other:
- benign: oval / reniform (long/short 1.5-2.5), smooth, homogeneous 20-45 HU, fatty hilum in 60 %;
- metastatic: round (1.0-1.4), lobulated margin (low-frequency radial harmonics), heterogeneous
  30-90 HU, central necrosis (0-20 HU) in 35 %, no hilum.
Short axes overlap between classes (log-normal, see the config) so the short-axis rule alone gives
a ROC AUC of about 0.7, as for colorectal cancer.

Truth per node: `short_axis_mm` / `long_axis_mm` are the radiology axes of the node's base
ellipsoid in the patient-axial plane (its central axial section is its largest), i.e. what
`nodes.extract_nodes` measures on a perfect mask; `short_axis_3d_mm` / `long_axis_3d_mm` are the
smallest / largest ellipsoid diameters.

Masks imitate an annotator: every node has its own label value 1..n (uint16 map); the outline is
the node shape with a per-slice random radial perturbation of about 0.5-1 voxel (a smooth angular
function, redrawn on every slice, plus a per-case bias), a voxel is labelled when at least half of
its slab is inside that outline (less for nodes thinner than half a slice), and the voxel holding
the node centre is always labelled.

Patients with several studies (25 %): same anatomy and nodes (node sizes change by up to 7 %),
another scanner, another table position, another contrast timing and bowel content.

Label noise in cohorts: exactly `round(label_noise * n_nodes)` node records (over the whole
cohort, each study's node counted on its own) get their `metastatic` flipped, chosen with a
generator seeded from the cohort seed; `true_metastatic` keeps the truth and
`label_flipped` == (metastatic != true_metastatic).

Everything is deterministic for a seed (numpy Generators only, no global state). Patient `p` of a
cohort with seed `s` uses `default_rng([s, p])` and its study `t` uses `default_rng([s, p, 1000 + t])`,
so a smaller cohort with the same seed is a prefix of a larger one.

What a scanner and a patient change is a setting of `PhantomConfig`: slice thicknesses, pixel
size, PSF, noise level and grain, the reconstruction kernel's noise texture (`noise_kernels`:
smooth low-pass or sharp band-pass), contrast timing (`contrast_timing`, > 1 = delayed phase),
tissue HU ranges and the node texture (`node_texture_wavelength_mm`, `*_texture_hu`). Their defaults
keep every random stream of earlier versions (same seed, same arrays). Presets (`phantoms --preset`):
`unseen` is a TEST preset, settings never used for training (other slice thicknesses, noisier and
sharper scanners with a wider PSF, delayed contrast, another node-texture grain), for testing
whether a model learned the generator rather than the nodes; `randomised` is a TRAINING preset
(domain randomisation): wider ranges of everything a scanner and a patient change, with holes
wherever `unseen` draws (range fields may be unions of intervals, `config.intervals`), so a model
trained on it has still never seen the `unseen` settings (Testing/test_phantoms.py checks this).

Package layout, by what each part models: `config` (settings, tissue ids, results), `shapes`
(geometry primitives and the targets they paint), `anatomy` (the patient's body, organs, vessels,
bowel), `nodes` (lymph node sizes, shapes, textures and placement), `scanner` (studies: contrast
timing, grid, rendering, PSF, noise, masks) and `cohort` (the public API, the sample case, the
command line). Everything a caller needs is imported here.
"""

from .config import NODE_FIRST, NOISE_KERNELS, PHANTOM_VERSION, PRESETS, TISSUES, PhantomCase, PhantomConfig, preset_config
from .scanner import estimated_case_mb
from .cohort import (
    SAMPLE_CASE, build_parser, generate_case, generate_cohort, main, run, sample_node_truths, write_case, write_sample_dataset,
)

__all__ = [
    "NODE_FIRST", "NOISE_KERNELS", "PHANTOM_VERSION", "PRESETS", "TISSUES", "PhantomCase", "PhantomConfig", "SAMPLE_CASE", "build_parser",
    "estimated_case_mb", "generate_case", "generate_cohort", "main", "preset_config", "run", "sample_node_truths", "write_case",
    "write_sample_dataset",
]
