// Render GLB files to PNG with three.js (GLTFLoader, MeshStandardMaterial PBR) in headless Chromium.
//
//   node render_glb.mjs JOBS.json
//
// JOBS.json: {"width": 256, "height": 256, "jobs": [{"glb": "in.glb", "png": "out.png", ...}]}.
// Per job (all optional but glb/png):
//   eye, target, up   camera in the file's (y-up) frame; no eye: frame the model's bounding sphere
//                     from direction `view` (default [0, 0.35, 1], i.e. the +Z front, a little above)
//   fov               vertical field of view in degrees (default 40)
//   environment       "room" (three's RoomEnvironment, prefiltered with PMREM; default) or "none"
//   lights            [{"direction": [x, y, z] (towards the light), "intensity": 2.0, "color": [r, g, b]}]
//   toneMapping       "neutral" (Khronos PBR Neutral, model-viewer's default; default), "aces", "none"
//   background        null (transparent: alpha is the silhouette; default) or [r, g, b] in 0..1
//   exposure          toneMappingExposure (default 1)
//   animationTime     seconds: play the GLB's animation `animation` (an index or a name; default 0)
//                     once and pose the scene at that time (AnimationMixer.setTime; clamped at the end)
//   morphWeights      [w0, w1, ...]: set every morphed mesh's morphTargetInfluences (after any animation)
// Prints one JSON line per job: {"png": ..., "materials": [...], "bounds": ..., "animations": [...],
// "morphs": [...]} (what the loader saw, and the influences the render used).
//
// Everything is served to the page from this folder through request interception, so nothing
// leaves the machine. Chromium comes from the @sparticuz/chromium npm package (a brotli-packed
// build inside the tarball, unpacked to the temp folder on first use); WebGL runs on SwiftShader.

import fs from 'node:fs';
import path from 'node:path';
import {fileURLToPath} from 'node:url';
import chromium from '@sparticuz/chromium';
import puppeteer from 'puppeteer-core';

const here = path.dirname(fileURLToPath(import.meta.url));
const ORIGIN = 'http://lift3d-viewer.invalid';

const PAGE = `<!doctype html>
<html><head><meta charset="utf-8">
<script type="importmap">
{"imports": {"three": "/node_modules/three/build/three.module.js",
             "three/addons/": "/node_modules/three/examples/jsm/"}}
</script></head>
<body style="margin:0">
<canvas id="view"></canvas>
<script type="module">
import * as THREE from 'three';
import {GLTFLoader} from 'three/addons/loaders/GLTFLoader.js';
import {RoomEnvironment} from 'three/addons/environments/RoomEnvironment.js';

const TONE = {neutral: THREE.NeutralToneMapping, aces: THREE.ACESFilmicToneMapping, none: THREE.NoToneMapping};

// One renderer and one prefiltered environment for all jobs: PMREM and shader compilation are
// the slow part on SwiftShader (seconds), the draw itself is not.
let renderer = null, pmrem = null, room = null;

window.renderGlb = async (job, width, height) => {
  const canvas = document.getElementById('view');
  if (!renderer) {
    renderer = new THREE.WebGLRenderer({canvas, antialias: true, alpha: true, preserveDrawingBuffer: true});
    renderer.setPixelRatio(1);
    renderer.setSize(width, height, false);
    renderer.outputColorSpace = THREE.SRGBColorSpace;
    pmrem = new THREE.PMREMGenerator(renderer);
  }
  const tone = job.toneMapping ?? 'neutral';
  if (!(tone in TONE)) throw new Error('unknown toneMapping ' + tone);
  renderer.toneMapping = TONE[tone];
  renderer.toneMappingExposure = job.exposure ?? 1.0;

  const scene = new THREE.Scene();
  if (job.background) scene.background = new THREE.Color().setRGB(...job.background, THREE.SRGBColorSpace);
  renderer.setClearColor(0x000000, job.background ? 1 : 0);
  const environment = job.environment ?? 'room';
  if (environment === 'room') {
    room ??= pmrem.fromScene(new RoomEnvironment(), 0.04).texture;
    scene.environment = room;
  }
  else if (environment !== 'none') throw new Error('unknown environment ' + environment);
  for (const light of job.lights ?? []) {
    const sun = new THREE.DirectionalLight(new THREE.Color(...(light.color ?? [1, 1, 1])), light.intensity ?? 2.0);
    sun.position.set(...light.direction);  // a directional light shines from its position to the origin
    scene.add(sun);
  }

  const gltf = await new GLTFLoader().loadAsync(job.url);
  scene.add(gltf.scene);
  const animations = gltf.animations.map((clip) => ({
    name: clip.name, duration: clip.duration,
    tracks: clip.tracks.map((track) => ({name: track.name, keyframes: track.times.length})),
  }));
  if (job.animationTime !== undefined && job.animationTime !== null) {
    const which = job.animation ?? 0;
    const clip = typeof which === 'number' ? gltf.animations[which] : THREE.AnimationClip.findByName(gltf.animations, which);
    if (!clip) throw new Error('no animation ' + which + ' (the GLB has ' + gltf.animations.length + ')');
    const mixer = new THREE.AnimationMixer(gltf.scene);
    const action = mixer.clipAction(clip);
    action.setLoop(THREE.LoopOnce, 1);
    action.clampWhenFinished = true;  // at t = duration hold the last keyframe instead of wrapping to 0
    action.play();
    mixer.setTime(job.animationTime);
  }
  const morphs = [];
  gltf.scene.traverse((object) => {
    if (!object.isMesh || !object.morphTargetInfluences) return;
    if (job.morphWeights) {
      if (job.morphWeights.length !== object.morphTargetInfluences.length)
        throw new Error('morphWeights has ' + job.morphWeights.length + ' values, ' + object.name + ' has '
                        + object.morphTargetInfluences.length + ' targets');
      job.morphWeights.forEach((w, i) => { object.morphTargetInfluences[i] = w; });
    }
    morphs.push({mesh: object.name, names: Object.keys(object.morphTargetDictionary ?? {}),
                 influences: Array.from(object.morphTargetInfluences)});
  });
  // Morphed meshes: the precise box follows the posed vertices (static ones keep the fast box).
  const box = new THREE.Box3().setFromObject(gltf.scene, morphs.length > 0);
  const sphere = box.getBoundingSphere(new THREE.Sphere());

  const camera = new THREE.PerspectiveCamera(job.fov ?? 40, width / height, 0.01, 1000);
  const target = job.target ? new THREE.Vector3(...job.target) : sphere.center.clone();
  let eye;
  if (job.eye) eye = new THREE.Vector3(...job.eye);
  else {
    const half = THREE.MathUtils.degToRad(camera.fov) / 2;
    const distance = 1.15 * sphere.radius / Math.sin(Math.min(half, Math.atan(Math.tan(half) * camera.aspect)));
    eye = target.clone().addScaledVector(new THREE.Vector3(...(job.view ?? [0, 0.35, 1])).normalize(), distance);
  }
  camera.position.copy(eye);
  camera.up.set(...(job.up ?? [0, 1, 0]));
  camera.lookAt(target);
  camera.near = Math.max(1e-3, eye.distanceTo(sphere.center) - 2 * sphere.radius);
  camera.far = eye.distanceTo(sphere.center) + 2 * sphere.radius;
  camera.updateProjectionMatrix();

  renderer.compile(scene, camera);
  renderer.render(scene, camera);
  const png = canvas.toDataURL('image/png');

  const materials = [];
  gltf.scene.traverse((object) => {
    if (!object.isMesh) return;
    const m = object.material;
    materials.push({
      mesh: object.name, type: m.type, metalness: m.metalness, roughness: m.roughness,
      map: !!m.map, metalnessMap: !!m.metalnessMap, roughnessMap: !!m.roughnessMap,
      normalMap: !!m.normalMap, aoMap: !!m.aoMap, vertexColors: m.vertexColors,
      mapSize: m.map && m.map.image ? [m.map.image.width, m.map.image.height] : null,
      attributes: Object.keys(object.geometry.attributes),
    });
  });
  gltf.scene.traverse((object) => {
    if (!object.isMesh) return;
    object.geometry.dispose();
    for (const value of Object.values(object.material)) if (value && value.isTexture) value.dispose();
    object.material.dispose();
  });
  return {png, materials, animations, morphs, bounds: {min: box.min.toArray(), max: box.max.toArray()},
          camera: {eye: eye.toArray(), target: target.toArray(), fov: camera.fov}};
};
window.viewerReady = true;
</script></body></html>`;

const TYPES = {'.js': 'text/javascript', '.mjs': 'text/javascript', '.json': 'application/json',
               '.glb': 'model/gltf-binary', '.html': 'text/html'};

async function main() {
  const spec = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const width = spec.width ?? 256, height = spec.height ?? 256;
  const models = spec.jobs.map((job) => path.resolve(job.glb));

  const browser = await puppeteer.launch({
    executablePath: await chromium.executablePath(),
    args: chromium.args,  // headless shell, WebGL through ANGLE + SwiftShader
    headless: 'shell',
    defaultViewport: {width, height},
  });
  try {
    const page = await browser.newPage();
    const problems = [];
    page.on('pageerror', (error) => problems.push(String(error)));
    page.on('console', (message) => {
      if (message.type() === 'error') problems.push(message.text());
    });
    await page.setRequestInterception(true);
    page.on('request', (request) => {
      const url = new URL(request.url());
      if (url.origin !== ORIGIN) return request.respond({status: 404, body: ''});
      let file = null;
      if (url.pathname === '/index.html') return request.respond({status: 200, contentType: TYPES['.html'], body: PAGE});
      const model = url.pathname.match(/^\/models\/(\d+)\.glb$/);
      if (model) file = models[Number(model[1])];
      else if (url.pathname.startsWith('/node_modules/')) {
        file = path.join(here, decodeURIComponent(url.pathname));
        if (!file.startsWith(path.join(here, 'node_modules') + path.sep)) file = null;
      }
      if (!file || !fs.existsSync(file)) return request.respond({status: 404, body: ''});
      request.respond({status: 200, contentType: TYPES[path.extname(file)] ?? 'application/octet-stream',
                       body: fs.readFileSync(file)});
    });
    await page.goto(ORIGIN + '/index.html');
    await page.waitForFunction('window.viewerReady === true', {timeout: 30000});
    for (const [index, job] of spec.jobs.entries()) {
      const options = {...job, url: `/models/${index}.glb`};
      const result = await page.evaluate((o, w, h) => window.renderGlb(o, w, h), options, width, height);
      if (problems.length) throw new Error(`${job.glb}: page errors: ${problems.join(' | ')}`);
      fs.writeFileSync(job.png, Buffer.from(result.png.split(',')[1], 'base64'));
      delete result.png;
      console.log(JSON.stringify({png: job.png, glb: job.glb, ...result}));
    }
  } finally {
    await browser.close();
  }
}

main().catch((error) => {
  console.error(error && error.stack ? error.stack : String(error));
  process.exit(2);
});
