// The 3D viewer of a lift3d report: every <div class="viewer" data-glb="..."> gets a three.js
// canvas with the GLB under RoomEnvironment light and OrbitControls (drag to turn, wheel to zoom).
// Drawn on demand (on load, on control changes and on resize), so an idle page costs nothing.
// Each viewer's data-state ends as "ready", "error", or "unavailable" (a file:// page: the note of
// the page's classic script says how to serve it); window.lift3dReport.ready resolves then.
import * as THREE from 'three';
import {GLTFLoader} from 'three/addons/loaders/GLTFLoader.js';
import {OrbitControls} from 'three/addons/controls/OrbitControls.js';
import {RoomEnvironment} from 'three/addons/environments/RoomEnvironment.js';

window.lift3dViewerStarted = true;

// lift3d's GLBs are y-up with the object's front on +x: look at it from the front-left, a little above.
const VIEW = new THREE.Vector3(1.0, 0.45, 0.75).normalize();

async function mount(element) {
  const canvas = element.querySelector('canvas');
  const status = element.querySelector('.status');
  const renderer = new THREE.WebGLRenderer({canvas, antialias: true, preserveDrawingBuffer: true});
  renderer.setPixelRatio(Math.min(window.devicePixelRatio || 1, 2));
  renderer.outputColorSpace = THREE.SRGBColorSpace;
  renderer.toneMapping = THREE.NeutralToneMapping;
  const scene = new THREE.Scene();
  scene.background = new THREE.Color(0xf4f5f7);
  const pmrem = new THREE.PMREMGenerator(renderer);
  scene.environment = pmrem.fromScene(new RoomEnvironment(), 0.04).texture;
  const camera = new THREE.PerspectiveCamera(35, 1, 0.01, 100);
  const controls = new OrbitControls(camera, canvas);
  controls.enableDamping = false;

  const draw = () => renderer.render(scene, camera);
  const resize = () => {
    const width = element.clientWidth || 320, height = Math.round(width * 0.75);
    renderer.setSize(width, height, false);
    canvas.style.width = width + 'px';
    canvas.style.height = height + 'px';
    camera.aspect = width / height;
    camera.updateProjectionMatrix();
    draw();
  };

  const gltf = await new GLTFLoader().loadAsync(element.dataset.glb);
  scene.add(gltf.scene);
  const sphere = new THREE.Box3().setFromObject(gltf.scene).getBoundingSphere(new THREE.Sphere());
  const radius = sphere.radius > 0 ? sphere.radius : 1.0;
  const distance = 1.2 * radius / Math.sin(THREE.MathUtils.degToRad(camera.fov) / 2);
  camera.position.copy(sphere.center).addScaledVector(VIEW, distance);
  camera.near = distance / 100;
  camera.far = distance * 10;
  controls.target.copy(sphere.center);
  controls.update();
  controls.addEventListener('change', draw);
  new ResizeObserver(resize).observe(element);
  resize();
  let triangles = 0;
  gltf.scene.traverse((object) => {
    if (object.isMesh) triangles += (object.geometry.index ? object.geometry.index.count : object.geometry.attributes.position.count) / 3;
  });
  status.textContent = `${triangles} triangles`;
  element.dataset.state = 'ready';
}

const viewers = [...document.querySelectorAll('.viewer')].map((element) =>
  mount(element).catch((error) => {
    if (location.protocol === 'file:' && window.lift3dNoViewer) {  // fetch() cannot read file:// URLs
      window.lift3dNoViewer(element);
      console.warn('lift3d report viewer:', element.dataset.glb, error);
      return;
    }
    element.dataset.state = 'error';
    element.querySelector('.status').textContent = 'could not show the model: ' + error;
    console.error('lift3d report viewer:', element.dataset.glb, error);
  }));
window.lift3dReport = {ready: Promise.all(viewers)};
