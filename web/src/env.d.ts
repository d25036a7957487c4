// Vite bundles CSS imported from TypeScript into one stylesheet.
declare module "*.css";
